"""Denoisers: memorizing (empirical), partially memorizing, Gaussian mixtures, a fitted
Gaussian, templates."""

from .base import Denoiser
from .empirical import EmpiricalDenoiser
from .gaussian import GaussianDenoiser, fit_gaussian
from .gmm import IsotropicGMM
from .learnable import (
    INIT_STRATEGIES,
    LearnableGMM,
    SplitLearnableGMM,
    grid_index,
    init_gaussian,
    init_pmem,
    init_prior,
    init_sphere,
    initialize,
)
from .lowrank import LearnableLowRankGMM, LowRankGMM
from .partial import PartialMemorizingDenoiser
from .templates import ColoredTemplates, LearnableColoredTemplates

__all__ = ["INIT_STRATEGIES", "ColoredTemplates", "Denoiser", "EmpiricalDenoiser",
           "GaussianDenoiser", "IsotropicGMM",
           "LearnableColoredTemplates", "LearnableGMM", "LearnableLowRankGMM", "LowRankGMM",
           "PartialMemorizingDenoiser", "SplitLearnableGMM", "grid_index", "init_gaussian",
           "fit_gaussian", "init_pmem", "init_prior", "init_sphere", "initialize"]
