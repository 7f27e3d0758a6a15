"""The comparison benchmark of softmax_mean against torch methods; see diffmem/tools/bench/.

    python benchmarks/compare.py [--quick] [--sizes "B,N,d;..."] [--device cuda] ...

is the same as ``diffmem bench ...``.
"""

import sys

from diffmem.tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
