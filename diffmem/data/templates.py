"""Colored-template data sets (SPEC H.2): templates from bundled digits or user images.

Default templates are scikit-learn's bundled 8x8 digits (no download), resized bicubically to
size x size and min-max normalised over the whole stack to [0, 1]. A sample is a template scaled
per channel by a random color: x[c] = color[c] * T_y, color ~ N(color_means[y], color_var I_C).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..denoisers.templates import ColoredTemplates
from ..diffusion.processes import VP, Process
from ._record import NpzRecord, int_at_least

DIGITS = 1797  # images in scikit-learn's bundled digits, the default templates


@dataclass
class TemplateData(NpzRecord):
    """train (N, C, H, W) with train_labels (N,), val (V, C, H, W) with val_labels (V,),
    templates (K, H, W) in [0, 1], color_means (K, C) and the shared color_var."""

    SCALARS = {"color_var": float, "seed": int}

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    templates: torch.Tensor
    color_means: torch.Tensor
    color_var: float
    seed: int = 0

    def ground_truth(self, process: Process | None = None, prediction: str = "eps",
                     logdet: str = "correct") -> ColoredTemplates:
        """The ground-truth denoiser ColoredTemplates(templates, color_means, color_var)."""
        return ColoredTemplates(self.templates, self.color_means, self.color_var,
                                process if process is not None else VP(), prediction, logdet)


def resize_and_normalize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(K, h, w) images -> (K, size, size): bicubic (align_corners=False), then min-max over the
    whole stack to [0, 1] (float64)."""
    int_at_least(size, "size", 1)
    out = F.interpolate(images.to(torch.float64)[:, None], size=(size, size), mode="bicubic",
                        align_corners=False)[:, 0]
    lo, hi = out.min(), out.max()
    if not hi > lo:
        raise ValueError("images must not all be constant (min-max normalisation divides by 0)")
    return (out - lo) / (hi - lo)


def digit_templates(components: int, size: int = 15, seed: int = 1) -> torch.Tensor:
    """K templates (K, size, size) from scikit-learn's bundled digits, chosen without replacement
    with a generator seeded by seed. Needs scikit-learn (pip install 'diffmem[templates]')."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("digit templates need scikit-learn: pip install 'diffmem[templates]' "
                          "(or pass your own templates)") from err
    images = torch.from_numpy(load_digits().images)                      # (DIGITS, 8, 8), 0..16
    int_at_least(components, "components", 1)
    if components > images.shape[0]:
        raise ValueError(f"components must be <= {images.shape[0]} digits, got {components}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(images.shape[0], generator=gen)[:components]
    return resize_and_normalize(images[idx], size)


def image_templates(images, size: int = 15) -> torch.Tensor:
    """Templates (K, size, size) from a (K, H, W) tensor or a list of image file paths (read as
    grayscale with PIL, which must be installed)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 3 or images.shape[0] == 0:
            raise ValueError(f"images must have shape (K, H, W), got {tuple(images.shape)}")
        return resize_and_normalize(images, size)
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError("images must be a (K, H, W) tensor or a non-empty list of file paths")
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("loading image files needs Pillow: pip install pillow") from err
    arrays = []
    for p in images:
        with Image.open(Path(p)) as im:
            arrays.append(torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float64)))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("image files must all have the same size")
    return resize_and_normalize(torch.stack(arrays), size)


def make_template_data(components: int = 6, samples: int = 100, seed: int = 0, *,
                       size: int = 15, channels: int = 3, color_var: float = 1.0,
                       val_samples: int = 100, templates=None, template_seed: int = 1,
                       dtype: torch.dtype = torch.float32) -> TemplateData:
    """Colored-template data: K templates (digits chosen with template_seed, or from `templates`,
    a (K, H, W) tensor or image paths), color_means = 0, train and val drawn from the ground truth.

    Same seed, same data; validation comes from an independent generator."""
    samples = int_at_least(samples, "samples", 1)
    val_samples = int_at_least(val_samples, "val_samples", 0)
    channels = int_at_least(channels, "channels", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(color_var, bool) or not isinstance(color_var, (int, float)) or not color_var > 0:
        raise ValueError(f"color_var must be a positive number, got {color_var!r}")
    if templates is None:
        temps = digit_templates(components, size, template_seed)
    else:
        temps = image_templates(templates, size)
    temps = temps.to(dtype)
    color_means = torch.zeros(temps.shape[0], channels, dtype=dtype)
    gt = ColoredTemplates(temps, color_means, float(color_var))
    train, train_labels = gt.sample(samples, torch.Generator().manual_seed(seed))
    val, val_labels = gt.sample(val_samples, torch.Generator().manual_seed(seed + 0x5EED))
    return TemplateData(train, train_labels, val, val_labels, temps, color_means,
                        float(color_var), seed)
