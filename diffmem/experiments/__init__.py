"""The paper's experiments (``diffmem phase-transition | sweep | crossover | memorize``).

- config.py       ExperimentConfig, presets ("default", "paper"), sweep grids, validation
                  (ConfigError)
- args.py         the commands' options and the config they describe (parsing only)
- runner.py       run_phase_transition(config, out, resume=...): start of run, the two training
                  phases (train, evaluate, locate the transition, refine), results, resume
- kind.py         ExperimentKind: the data-dependent steps a kind plugs into the runner
- gmm.py          the isotropic-GMM kind (the default)
- templates.py    the colored-template kind (--data templates)
- sweep.py        the (d, K, N) sweep (or image side, K, N for templates) with shards and a
                  summary table
- crossover.py    theory-only predictions of M*/N
- evaluate.py     measurements the kinds share: seeded losses, averages, the memorization ratio
- predictions.py  coded / instance-wise / measured crossover
- transition.py   the delta rule and the refinement sizes
- results.py      run-folder files: atomic JSON, environment info, the writable folder
- manifest.py     manifest.json: settings, version and SHA-256 of every file a run writes
- reuse.py        what --resume takes from a run folder, each file verified first
- lock.py         one run per folder (an OS file lock that dies with its process)
- budget.py       a run's memory, estimated and checked before it starts
- memorize.py     the memorizing, partially memorizing and generalizing denoisers sampled on
                  a real data set (``diffmem memorize``); memorize_config.py its settings and
                  options
- processes.py    runs of several processes under torchrun (rank, shares, collectives)
- runtime.py      --device, --backend, --precision and their record in results
- plots.py        PNG figures (matplotlib, optional)
- progress.py     progress lines on stderr

Import the submodules directly (e.g. ``from diffmem.experiments.runner import
run_phase_transition``).
"""

from .config import PRESETS, ConfigError, ExperimentConfig, make_config
from .runner import run_phase_transition

__all__ = ["ConfigError", "ExperimentConfig", "PRESETS", "make_config", "run_phase_transition"]
