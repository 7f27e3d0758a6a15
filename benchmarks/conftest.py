"""Options of the benchmark suite (see test_bench_softmax_mean.py)."""


def pytest_addoption(parser):
    parser.addoption("--bench-reference", action="store_true", default=False,
                     help="also benchmark the slow float64 'reference' backend")
