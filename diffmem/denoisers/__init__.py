"""Denoisers: memorizing (empirical), partially memorizing, Gaussian mixtures, templates."""

from .base import Denoiser
from .empirical import EmpiricalDenoiser
from .gmm import IsotropicGMM

__all__ = ["Denoiser", "EmpiricalDenoiser", "IsotropicGMM"]
