"""diffmem.distributed.softmax_mean on 2 gloo ranks against one process: see
diffmem/tools/bench/sharded.py (also run by ``diffmem bench --datasets``).

    python benchmarks/distributed_bench.py [--quick] [--size B,N,d] [--world 2] [--backward]
"""

import sys

from diffmem.tools.bench.sharded import main

if __name__ == "__main__":
    sys.exit(main())
