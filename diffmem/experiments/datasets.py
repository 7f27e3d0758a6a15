"""The data set of an experiment configuration: Gaussian mixture (SPEC H.1) or colored
templates (H.2, config.dim = image side, C = 3), made from the config or loaded from a run
folder."""

from __future__ import annotations

from pathlib import Path

from ..data import GMMData, TemplateData, make_gmm_data, make_template_data


def make_data(config) -> GMMData | TemplateData:
    """GMMData (train (N, d)) or TemplateData (train (N, 3, dim, dim)) for config.data."""
    if config.data == "templates":
        return make_template_data(config.components, config.samples, config.seed,
                                  size=config.dim, color_var=config.variance,
                                  val_samples=config.val_samples)
    return make_gmm_data(config.dim, config.components, config.samples, config.seed,
                         val_samples=config.val_samples, variance=config.variance)


def load_or_make_data(config, out: Path, resume: bool) -> GMMData | TemplateData:
    """out/data.npz when resuming and it exists, else make_data(config), saved there."""
    path = Path(out) / "data.npz"
    if resume and path.exists():
        return (TemplateData if config.data == "templates" else GMMData).load(path)
    data = make_data(config)
    data.save(path)
    return data


__all__ = ["load_or_make_data", "make_data"]
