"""diffmem: fast exact denoisers and experiments on memorization in diffusion models."""

from .ops import backends, knn, softmax_mean

__version__ = "0.1.0"

__all__ = ["backends", "knn", "softmax_mean", "__version__"]
