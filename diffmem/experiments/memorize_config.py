"""Settings and options of ``diffmem memorize``: MemorizeConfig, its validation and its
command-line parser.

The data's identity is part of the settings (``data_stamp``: the size and modification time
of a data file, or of a folder's image files), so that ``--resume`` refuses a data set that
changed since the run started.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..data.images import IMAGE_SUFFIXES
from .args import add_common_output
from .config import MAX_SEED, ConfigError
from .runtime import PRECISIONS, add_runtime_options

BUILTIN = ("digits", "gmm")
STORAGES = ("uint8", "float32")


@dataclass(frozen=True)
class MemorizeConfig:
    """One run of ``diffmem memorize``."""

    data: str = "digits"           # "digits", "gmm", or the path of an array file or folder
    array: str | None = None       # the member of a .npz file
    samples: int = 1000            # gmm: training points N
    dim: int = 30                  # gmm: d
    components: int = 4            # gmm: K
    storage: str = "float32"       # gmm: how the points are stored (uint8: quantized)
    fractions: tuple = (0.1, 0.5)  # M/N of the partially memorizing denoisers
    num_samples: int = 64          # DDIM samples per denoiser
    steps: int = 50                # DDIM steps
    t_min: float = 0.001           # the last time of the DDIM grid (t_max = 0.999)
    threshold: float = 1 / 3       # memorized iff d1 < threshold * d2
    seed: int = 0
    precision: str = "exact"
    data_stamp: str = ""           # size and mtime of the data file(s); "" for built-in data

    def tag(self) -> str:
        """Short name of the run, e.g. 'digits-s0' or 'gmm-d30-K4-N1000-float32-s0'."""
        if self.data == "gmm":
            return (f"gmm-d{self.dim}-K{self.components}-N{self.samples}-{self.storage}"
                    f"-s{self.seed}")
        if self.data == "digits":
            return f"digits-s{self.seed}"
        return f"{Path(self.data).stem or 'data'}-s{self.seed}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fractions"] = list(self.fractions)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> MemorizeConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["fractions"] = tuple(kw.get("fractions", ()))
        return cls(**kw)


def _int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        what = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be an integer {what}, got {value!r}")


def data_stamp(data: str) -> str:
    """'<bytes>:<mtime_ns>' of a data file, or summed / latest over a folder's images; '' for
    the built-in data sets. ConfigError if the path does not exist."""
    if data in BUILTIN:
        return ""
    path = Path(data)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"--data {data}: no such file or folder (expected digits, gmm, a "
                          f".npy/.npz file or a folder of PNG/JPEG images)")
    try:
        stats = [p.stat() for p in files]
    except OSError as e:
        raise ConfigError(f"--data {data}: cannot read {e.filename}: {e.strerror}") from None
    return (f"{len(files)}:{sum(s.st_size for s in stats)}:"
            f"{max((s.st_mtime_ns for s in stats), default=0)}")


def validate(c: MemorizeConfig) -> MemorizeConfig:
    """c with its fractions sorted, after checking every field (ConfigError, one line)."""
    if not c.data.strip():
        raise ConfigError("--data must be digits, gmm or a path, got an empty string")
    _int("--samples", c.samples, 2)
    _int("--dim", c.dim, 1)
    _int("--components", c.components, 1)
    _int("--num-samples", c.num_samples, 1)
    _int("--steps", c.steps, 1, 100_000)
    _int("--seed", c.seed, 0, MAX_SEED)
    if c.storage not in STORAGES:
        raise ConfigError(f"--storage must be one of {', '.join(STORAGES)}, got {c.storage!r}")
    if c.storage != "float32" and c.data != "gmm":
        raise ConfigError("--storage applies to --data gmm only (image data are stored as "
                          "their uint8 codes, float arrays as they are)")
    if c.data in BUILTIN and c.data_stamp:
        raise ConfigError("data_stamp is for data files only")
    if c.array is not None and not c.data.lower().endswith(".npz"):
        raise ConfigError("--array names a member of a .npz file; --data is not one")
    for f in c.fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ConfigError(f"--fractions must lie in (0, 1) (M/N of the partially memorizing "
                              f"denoisers), got {f!r}")
    if len({f"{f:g}" for f in c.fractions}) != len(c.fractions):  # they name the stages
        raise ConfigError(f"--fractions must be distinct (to 6 significant digits), got "
                          f"{list(c.fractions)}")
    for name, v, low, high in (("--t-min", c.t_min, 0, 0.5), ("--threshold", c.threshold, 0, 1)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and low < v <= high):
            raise ConfigError(f"{name} must be a number in ({low:g}, {high:g}], got {v!r}")
    if c.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
    return replace(c, fractions=tuple(sorted(float(f) for f in c.fractions)))


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    return values


_D = MemorizeConfig()


def add_memorize_parser(sub) -> None:
    """The ``memorize`` subcommand's options."""
    p = sub.add_parser(
        "memorize", help="the memorizing, partially memorizing and generalizing denoisers "
                         "sampled on a real data set",
        description="DDIM samples of the empirical (memorizing) denoiser of a data set, of "
                    "partially memorizing ones over seeded random subsets of M = f N points, and "
                    "of a generalizing baseline (the true mixture for gmm data, else a Gaussian "
                    "fitted to the data), all from the same initial noise; the memorization "
                    "ratio of each, the distinct training points they copy, the nearest point "
                    "and its weight, and the time per sampling step. Writes "
                    "runs/memorize-<tag>/results.json and plots/samples.png. Under torchrun "
                    "the samples are split over the processes, or with --shard-points the data "
                    "set.")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="digits", metavar="digits|gmm|PATH",
                   help="digits (scikit-learn's 8x8 digits, the default), gmm (an isotropic "
                        "Gaussian mixture: --samples, --dim, --components), a .npy/.npz array "
                        "(N, D), (N, H, W) or (N, H, W, C) channels last, or a folder of "
                        "PNG/JPEG images of one size. uint8 codes and images map to [-1, 1]; "
                        "float arrays are used as they are")
    d.add_argument("--array", metavar="NAME",
                   help="the array of a .npz file that holds several (default: its only one)")
    d.add_argument("--samples", type=int, help=f"gmm: training points N (default {_D.samples})")
    d.add_argument("--dim", type=int, help=f"gmm: dimension d (default {_D.dim})")
    d.add_argument("--components", type=int,
                   help=f"gmm: mixture components K (default {_D.components})")
    d.add_argument("--storage", choices=STORAGES,
                   help="gmm: store the points as float32 (default) or as uint8 codes with one "
                        "affine map for the whole set")
    s = p.add_argument_group("sampling")
    s.add_argument("--fractions", type=_fractions, metavar="F,F,...",
                   help="M/N of the partially memorizing denoisers (default 0.1,0.5; '' for "
                        "none)")
    s.add_argument("--num-samples", type=int,
                   help=f"DDIM samples per denoiser (default {_D.num_samples})")
    s.add_argument("--steps", type=int, help=f"DDIM steps (default {_D.steps})")
    s.add_argument("--t-min", type=float,
                   help=f"the last time of the DDIM grid, t_max = 0.999 (default {_D.t_min})")
    s.add_argument("--threshold", type=float,
                   help="memorized iff d1 < threshold d2 (default 1/3)")
    s.add_argument("--seed", type=int, help=f"seed of data, subsets and noise (default {_D.seed})")
    s.add_argument("--shard-points", action="store_true",
                   help="under torchrun: split the data set over the processes (each loads its "
                        "rows only) instead of the samples (a single process ignores it)")
    add_common_output(p)
    add_runtime_options(p)


_FIELDS = ("data", "array", "samples", "dim", "components", "storage", "fractions",
           "num_samples", "steps", "t_min", "threshold", "seed", "precision")


def config_from_args(args) -> MemorizeConfig:
    """The validated MemorizeConfig of parsed options (unset options take the defaults)."""
    values = {k: getattr(args, k, None) for k in _FIELDS}
    values = {k: v for k, v in values.items() if v is not None}
    given = [f"--{k}" for k in ("samples", "dim", "components", "storage") if k in values]
    if values.get("data", _D.data) != "gmm" and given:
        raise ConfigError(f"{', '.join(given)} apply to --data gmm only")
    c = validate(MemorizeConfig(**values))
    return replace(c, data_stamp=data_stamp(c.data))


__all__ = ["MemorizeConfig", "add_memorize_parser", "config_from_args", "data_stamp",
           "validate"]
