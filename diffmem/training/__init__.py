"""Training the laboratory's learnable models as the paper does (SPEC D, F).

- optim.py       ``ReferenceOptimizer`` (clip -> Adam -> EMA of the updates) and ``wsd_schedule``
- checkpoint.py  when and what a training loop checkpoints, restoring it, its run-folder file
- gmm.py         ``train_gmm_models``: all sizes M of the learnable GMM in one batched run
- templates.py   ``train_template_model(s)``: learnable colored templates, one size at a time
- store.py       ``save_models`` / ``load_models``: every trained-model type as .npz arrays plus
                 JSON metadata (no pickle), written atomically (diffmem.files)
- common.py      argument checks, the per-model seed and the divergence check the loops share
"""

from .checkpoint import BadTrainingState, Checkpointer
from .common import TrainingDiverged, model_seed
from .gmm import TrainedGMM, eps_losses, train_gmm_models
from .optim import ReferenceOptimizer, wsd_schedule
from .store import load_models, save_models
from .templates import TrainedTemplates, train_template_model, train_template_models

__all__ = ["BadTrainingState", "Checkpointer", "ReferenceOptimizer", "TrainedGMM",
           "TrainedTemplates", "TrainingDiverged", "eps_losses", "load_models", "model_seed",
           "save_models", "train_gmm_models", "train_template_model", "train_template_models",
           "wsd_schedule"]
