"""diffmem: fast exact denoisers and experiments on memorization in diffusion models.

The kernel layer (``softmax_mean``, ``knn``, the exact merges of partial results and
``distributed`` for points sharded over processes) and the laboratory of the paper "On the Edge of
Memorization in Diffusion Models": processes, denoisers, losses, samplers, metrics, theory,
data and training. See the README for the full API.
"""

from . import theory
from .data import GMMData, TemplateData, make_gmm_data, make_template_data
from .denoisers import (
    ColoredTemplates,
    Denoiser,
    EmpiricalDenoiser,
    IsotropicGMM,
    LearnableColoredTemplates,
    LearnableGMM,
    LearnableLowRankGMM,
    LowRankGMM,
    PartialMemorizingDenoiser,
    SplitLearnableGMM,
)
from .diffusion import (
    VE,
    VP,
    FlowMatching,
    Process,
    convert,
    ddim_sample,
    ddpm_sample,
    dsm_loss,
    euler_ode_sample,
    loss_per_t,
    loss_scale,
    time_grid,
    time_weights,
    training_loss,
)
from .metrics import learned_means_metrics, memorization_ratio
from .ops import (
    backends,
    distributed,
    knn,
    merge_knn,
    merge_nearest,
    merge_softmax_means,
    softmax_mean,
)
from .training import ReferenceOptimizer, TrainedGMM, train_gmm_models, wsd_schedule

__version__ = "0.1.0"

__all__ = [
    "ColoredTemplates", "Denoiser", "EmpiricalDenoiser", "FlowMatching", "GMMData", "IsotropicGMM",
    "LearnableColoredTemplates", "LearnableGMM", "LearnableLowRankGMM", "LowRankGMM",
    "PartialMemorizingDenoiser", "Process", "ReferenceOptimizer", "SplitLearnableGMM",
    "TemplateData", "TrainedGMM", "VE", "VP", "__version__", "backends", "convert", "ddim_sample",
    "ddpm_sample", "distributed", "dsm_loss", "euler_ode_sample", "knn", "learned_means_metrics",
    "loss_per_t", "loss_scale", "make_gmm_data", "make_template_data", "memorization_ratio",
    "merge_knn", "merge_nearest", "merge_softmax_means", "softmax_mean",
    "theory", "time_grid", "time_weights", "train_gmm_models", "training_loss", "wsd_schedule",
]
