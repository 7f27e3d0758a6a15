"""The paper's experiments (``diffmem phase-transition | sweep | crossover``).

- config.py            ExperimentConfig, presets ("default", "paper"), validation (ConfigError)
- datasets.py          the data set of a configuration (GMM or colored templates)
- phase_transition.py  run_phase_transition(config, out, resume=...): one configuration
- templates_run.py     the same experiment on colored templates (--data templates)
- sweep.py             the (d, K, N) sweep (or image side, K, N for templates) with shards and a
                       summary table
- crossover.py         theory-only predictions of M*/N
- evaluate.py          baselines and trained-model evaluation per t and per M
- predictions.py       coded / instance-wise / measured crossover
- transition.py        the delta rule and the refinement sizes
- results.py           atomic JSON, .npz checkpoints, environment info
- plots.py             PNG figures (matplotlib, optional)
- progress.py          progress lines on stderr
- cli.py               argparse definitions and dispatch

Import the submodules directly (e.g. ``from diffmem.experiments.phase_transition import
run_phase_transition``).
"""

from .config import PRESETS, ConfigError, ExperimentConfig, make_config
from .phase_transition import run_phase_transition

__all__ = ["ConfigError", "ExperimentConfig", "PRESETS", "make_config", "run_phase_transition"]
