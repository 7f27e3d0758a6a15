"""Processes, parametrizations, losses and samplers."""

from .parametrization import FIELDS, convert, from_x0, loss_scale, to_x0
from .processes import VE, VP, FlowMatching, Process, time_grid

__all__ = ["FIELDS", "FlowMatching", "Process", "VE", "VP", "convert", "from_x0", "loss_scale",
           "time_grid", "to_x0"]
