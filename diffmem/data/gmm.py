"""Isotropic Gaussian-mixture data sets (SPEC H.1), deterministic per seed, saved as .npz."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..denoisers.gmm import IsotropicGMM
from ..diffusion.processes import VP, Process
from ._record import NpzRecord, int_at_least


@dataclass
class GMMData(NpzRecord):
    """A GMM data set: train (N, d) with train_labels (N,), val (V, d) with val_labels (V,),
    means (K, d) on the sphere of radius sqrt(d), variance sigma0^2 and priors (K,)."""

    SCALARS = {"variance": float, "seed": int}

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    means: torch.Tensor
    variance: float
    priors: torch.Tensor
    seed: int = 0

    def ground_truth(self, process: Process | None = None, prediction: str = "eps",
                     **kwargs) -> IsotropicGMM:
        """The ground-truth denoiser IsotropicGMM(means, variance, priors); kwargs go to it."""
        return IsotropicGMM(self.means, self.variance, self.priors,
                            process if process is not None else VP(), prediction, **kwargs)


def make_gmm_data(dim: int, components: int, samples: int, seed: int, *, val_samples: int = 100,
                  variance: float = 1.0, dtype: torch.dtype = torch.float32) -> GMMData:
    """Means mu_k = sqrt(d) z_k/||z_k||, z_k ~ N(0, I_d); priors 1/K; N train and val_samples
    validation points x = mu_label + sqrt(variance) z. Same seed, same data (torch.Generator)."""
    dim = int_at_least(dim, "dim")
    components = int_at_least(components, "components")
    samples = int_at_least(samples, "samples")
    val_samples = int_at_least(val_samples, "val_samples", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not variance > 0:
        raise ValueError(f"variance must be a positive number, got {variance!r}")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(components, dim, generator=gen, dtype=torch.float64)
    means = (math.sqrt(dim) * z / z.norm(dim=1, keepdim=True)).to(dtype)
    priors = torch.full((components,), 1.0 / components, dtype=dtype)
    gt = IsotropicGMM(means, float(variance), priors)
    train, train_labels = gt.sample(samples, generator=gen)
    val_gen = torch.Generator().manual_seed(seed + 0x5EED)  # an independent stream for validation
    val, val_labels = gt.sample(val_samples, generator=val_gen)
    return GMMData(train, train_labels, val, val_labels, means, float(variance), priors, seed)
