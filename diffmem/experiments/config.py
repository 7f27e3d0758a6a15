"""Experiment configuration: the hyperparameters of SPEC F.5 as one dataclass, and presets.

- ``ExperimentConfig``: every knob of one phase-transition run (data, training, evaluation).
- ``PRESETS``: "default" (quick, d=30 K=4 N=100, shows the transition on a 2-core CPU: 10,000
  steps, warmup 1,000, lr 0 -> 1.5e-2 -> 1e-5, 10 draws, gradient clip 1e3, 100 eval samples) and
  "paper" (SPEC F.5 sweep values: 50,000 steps, warmup 5,000, lr 0 -> 1e-3 -> 1e-6, 100 draws,
  clip 1e9, 50 eval samples).
- ``GRIDS``: the default (d, K, N) grid of the sweep for each data kind.
- ``large_n_schedule(N)``: the default preset's draws and steps for N > 200 (below).
- ``make_config(preset, **overrides)``: a validated config; bad values raise ConfigError with a
  one-line message (the CLI turns it into exit code 2). Every number must lie in its sane range
  (``validate``); sizes are kept sorted, so their order never makes two configs differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..data.templates import DIGITS


class ConfigError(ValueError):
    """A bad experiment setting; the message is one line, meant for the user."""


@dataclass(frozen=True)
class ExperimentConfig:
    """One phase-transition experiment (defaults = the "default" preset)."""

    data: str = "gmm"              # "gmm" (SPEC H.1) or "templates" (H.2)
    dim: int = 30                  # d
    components: int = 4            # K
    samples: int = 100             # N, training points
    val_samples: int = 100         # validation points
    eval_samples: int = 100        # DDIM samples for the memorization ratio (paper: 50)
    variance: float = 1.0          # sigma0^2 of the ground truth
    seed: int = 1
    # training (SPEC F.2-F.5)
    steps: int = 10000
    warmup: int = 1000
    init_lr: float = 0.0
    peak_lr: float = 1.5e-2
    final_lr: float = 1e-5
    draws: int = 10                # noise draws per sample per step
    init: str = "pmem"
    init_var: float = 1e-6
    clip: float = 1e3              # paper 1e9; 1e3 keeps the std's Adam second moment from being
                                   # dominated for ~10^4 steps by the huge gradients of the 1e-3
                                   # PMEM init std, so the std can grow (to ~0.8 for M = N/10)
    ema: float = 0.99
    sizes: tuple = ()              # trained sizes M; () = range(N/10, N+1, N/10)
    refine: bool = True            # refine around the transition (SPEC G.5)
    delta: float = 0.1             # transition rule threshold
    coverage: int = 10             # num_models_coverage of the refinement
    # evaluation
    threshold: float = 1 / 3       # memorization ratio: d1 < threshold * d2
    eval_draws: int = 100          # noise draws per sample for the per-t losses
    baseline_step: int = 0         # pmem baseline sizes range(s, N+1, s) when > 0
    baseline_points: int = 20      # else, when > 0: about this many sizes in steps of N/points
                                   # (both 0: the paper's range(s, N+1, s), s = max(N // 100, 1))
    plot_t_indices: tuple = (16,)  # grid indices for the loss-vs-M/N plots (ts[16] = 0.3603)
    preset: str = "default"

    def train_sizes(self) -> list[int]:
        """The initial trained sizes M (ascending)."""
        if self.sizes:
            return sorted(int(m) for m in self.sizes)
        step = self.samples // 10
        return list(range(step, self.samples + 1, step))

    def baseline_sizes(self) -> list[int]:
        """Sizes M of the partially memorizing baseline (ascending)."""
        if self.baseline_step:
            s = self.baseline_step
        elif self.baseline_points:
            return sorted({max(1, round(k * self.samples / self.baseline_points))
                           for k in range(1, self.baseline_points + 1)})
        else:
            s = max(self.samples // 100, 1)
        return list(range(s, self.samples + 1, s))

    def tag(self) -> str:
        """Short name of the configuration, e.g. 'gmm-d30-K4-N100-s1'."""
        return f"{self.data}-d{self.dim}-K{self.components}-N{self.samples}-s{self.seed}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sizes"], out["plot_t_indices"] = list(self.sizes), list(self.plot_t_indices)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ExperimentConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["sizes"] = tuple(sorted(kw.get("sizes", ())))
        kw["plot_t_indices"] = tuple(kw.get("plot_t_indices", (16,)))
        return cls(**kw)


# Colored-template runs (--data templates): dim is the image side (images dim x dim x 3) and
# these values replace the GMM ones under each preset (SPEC F.5 colored: clip 1e3, ema 0.1).
TEMPLATE_PRESETS: dict[str, dict] = {
    "default": dict(dim=15, components=6, steps=300, warmup=15, peak_lr=1e-3, final_lr=1e-7,
                    draws=10, clip=1e3, ema=0.1, init_var=1e-6, baseline_points=10),
    "paper": dict(dim=15, components=6, steps=100_000, warmup=5_000, init_lr=0.0, peak_lr=1e-4,
                  final_lr=1e-8, draws=100, clip=1e3, ema=0.1, init_var=1e-6, baseline_step=2,
                  baseline_points=0),
}

# Default (dims, components, samples) grid of ``diffmem sweep`` for each data kind (templates:
# image side x K x N, 2 x 2 x 2 around the paper's 15x15, K = 6, N = 100 run).
GRIDS = {
    "gmm": ([30, 40, 50, 60], [3, 6, 9, 12], [50, 100, 150, 200]),
    "templates": ([10, 15], [3, 6], [50, 100]),
}

PRESETS: dict[str, dict] = {
    "default": {},
    "paper": dict(steps=50_000, warmup=5_000, init_lr=0.0, peak_lr=1e-3, final_lr=1e-6,
                  draws=100, clip=1e9, ema=0.99, init_var=1e-6, eval_samples=50, baseline_step=0,
                  baseline_points=0, preset="paper"),
}


MAX_SEED = 2 ** 62      # torch generators take 64 bits; the data add offsets to the seed
MAX_STEPS = 10 ** 9
MAX_LR = 10.0           # Adam moves each parameter by about lr per step
VARIANCES = (1e-6, 1e6)  # data variance: float32 samples stay distinct, squares finite
INIT_VARIANCES = (1e-30, 1e6)  # initial variance: its float32 std stays nonzero


def _int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        what = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name} must be an integer {what}, got {value!r}")


def _num(name: str, value, low: float, high: float = math.inf, open_low: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if open_low else value >= low) and value <= high)
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low:g}, {high:g}], "
                          f"got {value!r}")


def validate(c: ExperimentConfig) -> ExperimentConfig:
    """Check every field against its range; raise ConfigError (one line) on the first problem.
    Returns c with its sizes sorted. Sizes that would not fit in memory are refused later, by
    budget.check_memory, which knows the machine."""
    if c.data not in ("gmm", "templates"):
        raise ConfigError(f"data must be 'gmm' or 'templates', got {c.data!r}")
    for name, lo in (("dim", 1), ("components", 1), ("samples", 2), ("val_samples", 1),
                     ("eval_samples", 1), ("steps", 1), ("warmup", 0), ("draws", 1),
                     ("eval_draws", 1), ("baseline_step", 0), ("baseline_points", 0),
                     ("coverage", 1)):
        _int(name, getattr(c, name), lo)
    _int("seed", c.seed, 0, MAX_SEED)
    _int("steps", c.steps, 1, MAX_STEPS)
    if c.warmup > c.steps:
        raise ConfigError(f"warmup ({c.warmup}) must not exceed steps ({c.steps})")
    if c.data == "templates" and c.components > DIGITS:
        raise ConfigError(f"components must be at most {DIGITS} for --data templates (the "
                          f"bundled digits), got {c.components}")
    _num("variance", c.variance, *VARIANCES)
    for name in ("init_lr", "final_lr"):
        _num(name, getattr(c, name), 0, MAX_LR)
    _num("peak_lr", c.peak_lr, 0, MAX_LR, open_low=True)
    _num("init_var", c.init_var, *INIT_VARIANCES)
    _num("clip", c.clip, 0, open_low=True)
    _num("ema", c.ema, 0, 0.999999)
    _num("delta", c.delta, 0, 0.5, open_low=True)
    _num("threshold", c.threshold, 0, 1, open_low=True)
    if c.init != "pmem":
        raise ConfigError(f"init must be 'pmem' (the paper's initialization), got {c.init!r}")
    if c.sizes:
        for m in c.sizes:
            if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= c.samples:
                raise ConfigError(f"sizes must be integers in [1, N={c.samples}], got {m!r}")
        if len(set(c.sizes)) != len(c.sizes):
            raise ConfigError(f"sizes must be distinct, got {list(c.sizes)}")
    elif c.samples % 10:
        raise ConfigError(f"samples (N={c.samples}) must be divisible by 10 for the default sizes "
                          f"range(N/10, N+1, N/10); pass --sizes otherwise")
    if c.baseline_step > c.samples:
        raise ConfigError(f"baseline_step ({c.baseline_step}) must not exceed N ({c.samples})")
    if c.baseline_points > c.samples:
        raise ConfigError(f"baseline_points ({c.baseline_points}) must not exceed N "
                          f"({c.samples})")
    for j in c.plot_t_indices:
        _int("plot_t_indices[i]", j, 0)
        if j >= 26:
            raise ConfigError(f"plot t indices must be < 26 (the grid size), got {j}")
    if c.preset not in PRESETS:
        raise ConfigError(f"unknown preset {c.preset!r}; choose from {sorted(PRESETS)}")
    return replace(c, sizes=tuple(sorted(c.sizes)))


# Above the paper's sizes (N > LARGE_N_FROM) the default preset keeps about LARGE_N_QUERIES
# noisy training samples per step (draws = max(1, LARGE_N_QUERIES // N), as N = 100 with 10
# draws has) and shortens training to max(LARGE_N_MIN_STEPS, 10,000 * 100 / N) steps (warmup a
# tenth), so the run grows like N^2 per step, not N^3: measured at N = 1000 (3000 steps,
# 1 draw), the trained models show the transition at the same M/N as the N = 100 run (ratio
# 0.49 at M = 0.8 N, 0.08 at 0.7 N). Loss evaluation keeps about 10,000 noisy samples per t
# (eval_draws = max(20, 10,000 // N)). Settings given explicitly are kept.
LARGE_N_FROM = 200
LARGE_N_QUERIES = 1000
LARGE_N_MIN_STEPS = 3000


def large_n_schedule(samples: int) -> dict:
    """The default preset's draws, steps, warmup and eval_draws for N = samples training
    points: {} for N <= LARGE_N_FROM (the preset as it is), else values scaled as described
    above."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= LARGE_N_FROM:
        return {}
    steps = max(LARGE_N_MIN_STEPS, 10_000 * 100 // samples)
    return {"draws": max(1, LARGE_N_QUERIES // samples), "steps": steps, "warmup": steps // 10,
            "eval_draws": max(20, 10_000 // samples)}


def make_config(preset: str = "default", **overrides) -> ExperimentConfig:
    """The preset's config with overrides (None values are ignored), validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    values = dict(PRESETS[preset])
    if overrides.get("data") == "templates":
        values.update(TEMPLATE_PRESETS[preset])
    values["preset"] = preset
    values.update(overrides)
    known = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown settings {unknown}")
    if "sizes" in values:
        values["sizes"] = tuple(values["sizes"])
    if "plot_t_indices" in values:
        values["plot_t_indices"] = tuple(values["plot_t_indices"])
    if preset == "default" and values.get("data", "gmm") == "gmm":
        scaled = large_n_schedule(values.get("samples", ExperimentConfig.samples))
        if "steps" in overrides:
            scaled.pop("warmup", None)  # the user's steps keep the preset's warmup rule
        values.update({k: v for k, v in scaled.items() if k not in overrides})
    c = ExperimentConfig(**values)
    if preset == "paper" and "warmup" not in overrides and "steps" in overrides:
        # the paper's warmup: S // 10 (GMM sweep), S // 20 (colored run)
        c = replace(c, warmup=c.steps // (20 if c.data == "templates" else 10))
    return validate(c)


__all__ = ["ConfigError", "ExperimentConfig", "GRIDS", "INIT_VARIANCES", "LARGE_N_FROM",
           "LARGE_N_MIN_STEPS",
           "LARGE_N_QUERIES", "MAX_LR", "MAX_SEED", "MAX_STEPS", "PRESETS", "TEMPLATE_PRESETS",
           "VARIANCES", "large_n_schedule", "make_config", "validate"]
