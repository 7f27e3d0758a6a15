"""Training learnable colored-template models (SPEC C.7, F.1-F.5, colored experiment).

``train_template_models`` trains one ``LearnableColoredTemplates`` per size M, one after
another, full batch, EPS loss on the 26-point grid: PMEM init, then clip -> Adam -> EMA of the
updates (``ReferenceOptimizer``) under the warmup-decay schedule. Each model's randomness (init,
per-sample t, noise) comes from its own generator seeded by ``model_seed(seed, M)``. Training
checkpoints and resumes mid-model with checkpoint.py's Checkpointer / training_state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..denoisers.templates import ColoredTemplates, LearnableColoredTemplates
from ..diffusion.loss import dsm_loss
from ..diffusion.processes import time_grid
from .checkpoint import Checkpointer, load_training_state, training_state
from .common import check_finite, check_int, check_sizes, model_seed
from .optim import ReferenceOptimizer, wsd_schedule


@dataclass
class TrainedTemplates:
    """One trained model: size M, templates (M, H, W), color_means (M, C), color_std and the
    training loss before each step (steps,), EPS units."""

    size: int
    templates: torch.Tensor
    color_means: torch.Tensor
    color_std: float
    losses: torch.Tensor

    @property
    def variance(self) -> float:
        """The learned color variance color_std^2 (SPEC G.3)."""
        return float(self.color_std) ** 2

    def denoiser(self, prediction: str = "x0", **kwargs) -> ColoredTemplates:
        """The trained model as a fixed ColoredTemplates (color variance color_std^2)."""
        var = max(self.variance, torch.finfo(self.templates.dtype).tiny)
        return ColoredTemplates(self.templates, self.color_means, var, prediction=prediction,
                                **kwargs)

    def means(self) -> torch.Tensor:
        """Learned component means color_means_k (x) templates_k, shape (M, C, H, W)."""
        return self.color_means[:, :, None, None] * self.templates[:, None]


def train_template_model(data, M: int, *, steps: int, warmup: int, init_lr: float = 0.0,
                         peak_lr: float = 1e-4, final_lr: float = 1e-8, draws: int = 100,
                         init_var: float = 1e-6, clip: float = 1e3, ema: float = 0.1,
                         seed: int = 0, grid: torch.Tensor | None = None,
                         progress: Callable[[int, int, float], None] | None = None,
                         checkpoint: Callable[[dict], None] | None = None,
                         checkpoint_every: int = 0, checkpoint_seconds: float | None = None,
                         resume_state: dict | None = None) -> TrainedTemplates:
    """Train one model of size M on data (a TemplateData: train (N, C, H, W), train_labels (N,),
    templates (K, H, W)). Step k draws t (N,) from grid and noise (N*draws, C, H, W) from the
    model's generator; lr = wsd_schedule(k, steps, warmup, steps - warmup, ...).

    checkpoint / checkpoint_every / checkpoint_seconds / resume_state as in train_gmm_models
    (sizes [M]; tensors templates (M, H, W), color_means (M, C), color_std (), losses (step,)):
    a run resumed from a checkpoint ends exactly as an uninterrupted one. A NaN or infinite
    loss or parameter stops it with TrainingDiverged."""
    M = check_int(M, "M", 1)
    steps, warmup = check_int(steps, "steps", 1), check_int(warmup, "warmup")
    draws = check_int(draws, "draws", 1)
    wsd_schedule(0, steps, warmup, steps - warmup)  # validates the schedule
    saver = Checkpointer(checkpoint, checkpoint_every, checkpoint_seconds)
    x = data.train
    grid = (time_grid() if grid is None else grid).to(x.dtype)
    gen = torch.Generator().manual_seed(model_seed(seed, M))
    gt = data.ground_truth()
    model = LearnableColoredTemplates.initialize("pmem", M, data=x, labels=data.train_labels,
                                                 ground_truth=gt, generator=gen,
                                                 color_var=init_var, prediction="eps")
    params = {"templates": model.templates, "color_means": model.color_means,
              "color_std": model.color_std}
    opt = ReferenceOptimizer(list(params.values()),
                             lambda k: wsd_schedule(k, steps, warmup, steps - warmup, init_lr,
                                                    peak_lr, final_lr),
                             clip=clip, ema=ema)
    losses = torch.empty(steps, dtype=torch.float64)
    start = 0
    if resume_state is not None:
        start = load_training_state(resume_state, [M], steps, seed, params, opt, [gen], losses)
    for k in range(start, steps):
        t = grid[torch.randint(0, grid.numel(), (x.shape[0],), generator=gen)]
        loss = dsm_loss(model, x, t, draws=draws, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        check_finite(k + 1, steps, [M], loss, params.values())
        losses[k] = float(loss.detach())
        if progress is not None:
            progress(k, steps, losses[k])
        if saver.due(k + 1, steps):
            saver.save(training_state(k + 1, [M], steps, seed, params, opt, [gen], losses))
    return TrainedTemplates(M, model.templates.detach().clone(),
                            model.color_means.detach().clone(), float(model.color_std.detach()),
                            losses)


def train_template_models(data, sizes: Sequence[int], *, done: Callable | None = None,
                          **kwargs) -> dict[int, TrainedTemplates]:
    """train_template_model for each M in sizes (one after another); done(M, model) is called
    after each, e.g. to checkpoint. Returns {M: TrainedTemplates}."""
    out = {}
    for M in check_sizes(sizes):
        out[M] = train_template_model(data, M, **kwargs)
        if done is not None:
            done(M, out[M])
    return out


__all__ = ["TrainedTemplates", "train_template_model", "train_template_models"]
