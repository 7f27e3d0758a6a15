"""The kernel layer: fused softmax-weighted means and exact nearest neighbours."""

from ._backends import backends
from .knn import knn
from .softmax_mean import softmax_mean

__all__ = ["backends", "knn", "softmax_mean"]
