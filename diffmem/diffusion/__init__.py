"""Processes, parametrizations, losses and samplers."""

from .loss import (
    TARGETS,
    dsm_loss,
    dsm_target,
    loss_per_t,
    time_weights,
    training_loss,
    weighted_loss,
)
from .parametrization import FIELDS, convert, from_x0, loss_scale, to_x0
from .processes import VE, VP, FlowMatching, Process, time_grid
from .samplers import ddim_sample, ddpm_sample, euler_ode_sample

__all__ = ["FIELDS", "TARGETS", "FlowMatching", "Process", "VE", "VP", "convert", "ddim_sample",
           "ddpm_sample", "dsm_loss", "dsm_target", "euler_ode_sample", "from_x0", "loss_per_t",
           "loss_scale", "time_grid", "time_weights", "to_x0", "training_loss", "weighted_loss"]
