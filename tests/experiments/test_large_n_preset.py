"""The default preset above the paper's sizes: draws, steps and evaluation draws scale with N,
the paper's sizes (N <= 200) and explicit settings are left as they are."""

import pytest

from diffmem.experiments.config import (
    LARGE_N_FROM,
    LARGE_N_QUERIES,
    ExperimentConfig,
    large_n_schedule,
    make_config,
)


@pytest.mark.parametrize("n", [20, 100, 150, LARGE_N_FROM])
def test_paper_sizes_keep_the_preset(n):
    c = make_config(samples=n, sizes=[1])
    d = ExperimentConfig()
    assert (c.draws, c.steps, c.warmup, c.eval_draws) == (d.draws, d.steps, d.warmup,
                                                           d.eval_draws)
    assert large_n_schedule(n) == {}


@pytest.mark.parametrize("n, draws, steps, eval_draws", [(250, 4, 4000, 40), (500, 2, 3000, 20),
                                                         (1000, 1, 3000, 20),
                                                         (100_000, 1, 3000, 20)])
def test_large_n_scales(n, draws, steps, eval_draws):
    c = make_config(samples=n, sizes=[1])
    assert (c.draws, c.steps, c.warmup, c.eval_draws) == (draws, steps, steps // 10, eval_draws)
    assert c.draws * n >= min(LARGE_N_QUERIES, n) * 0.75  # about as many noisy samples a step


def test_explicit_settings_win():
    c = make_config(samples=1000, sizes=[1], steps=5000, draws=3, eval_draws=7)
    assert (c.steps, c.draws, c.eval_draws) == (5000, 3, 7)
    assert c.warmup == ExperimentConfig().warmup  # the preset's, not a tenth of the scaled steps
    c = make_config(samples=1000, sizes=[1], warmup=10)
    assert (c.steps, c.warmup) == (3000, 10)


def test_other_presets_and_data_do_not_scale():
    paper = make_config("paper", samples=1000, sizes=[1])
    assert (paper.steps, paper.draws) == (50_000, 100)
    templates = make_config(data="templates", samples=1000, sizes=[1])
    assert templates.draws == make_config(data="templates", sizes=[1]).draws
