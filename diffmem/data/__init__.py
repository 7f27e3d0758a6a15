"""Synthetic data generators (SPEC H)."""

from .gmm import GMMData, make_gmm_data

__all__ = ["GMMData", "make_gmm_data"]
