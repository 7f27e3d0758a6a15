"""The kernel layer: fused softmax-weighted means and exact nearest neighbours."""

from . import distributed
from ._backends import backends
from .knn import knn
from .merge import merge_knn, merge_nearest, merge_softmax_means
from .softmax_mean import softmax_mean

__all__ = ["backends", "distributed", "knn", "merge_knn", "merge_nearest", "merge_softmax_means",
           "softmax_mean"]
