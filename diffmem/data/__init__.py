"""Synthetic data of the paper: Gaussian mixtures and colored image templates (no downloads)."""

from .gmm import GMMData, make_gmm_data
from .templates import TemplateData, digit_templates, image_templates, make_template_data

__all__ = ["GMMData", "TemplateData", "digit_templates", "image_templates", "make_gmm_data",
           "make_template_data"]
