"""``spectra.train``: the training suite that produces the checkpoints spectra
analyses — ResNet-32 on (long-tailed) CIFAR with CE / LDAM / VS losses, DRW,
SGD, SAM and the saddle-escaping baselines PGD and LPF-SGD.

Library use::

    from spectra.train import resolve_config, fit
    cfg = resolve_config("ce-drw-sam", dataset="cifar10-lt", data_root="~/data", epochs=200)
    result = fit(cfg, "runs/ce-drw-sam")
    print(result.summary["final"]["acc"], result.summary["final"]["tail_acc"])
"""
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_training_checkpoint, model_from_checkpoint
from .ensemble import Ensemble, fit_ensemble, fit_ensembles, group_for_ensembles
from .config import METHOD_DESCRIPTIONS, METHODS, TrainConfig, parse_override, resolve_config
from .evaluation import class_groups, evaluate, tail_classes
from .lockstep import fit_many
from .losses import LDAMLoss, VSLoss, WeightedCrossEntropy, build_loss, effective_number_weights, ldam_margins, vs_scales_and_offsets
from .sam import sam_perturbation
from .schedule import drw_active, learning_rate
from .sgd import TensorLRSGD
from .trainer import FitResult, Trainer, fit

__all__ = [
    "TrainConfig",
    "METHODS",
    "METHOD_DESCRIPTIONS",
    "resolve_config",
    "parse_override",
    "fit",
    "fit_many",
    "fit_ensemble",
    "fit_ensembles",
    "group_for_ensembles",
    "Ensemble",
    "Trainer",
    "FitResult",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "load_training_checkpoint",
    "model_from_checkpoint",
    "effective_number_weights",
    "ldam_margins",
    "vs_scales_and_offsets",
    "WeightedCrossEntropy",
    "LDAMLoss",
    "VSLoss",
    "build_loss",
    "sam_perturbation",
    "TensorLRSGD",
    "learning_rate",
    "drw_active",
    "evaluate",
    "tail_classes",
    "class_groups",
]
