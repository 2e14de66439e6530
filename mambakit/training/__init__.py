"""Training: the configuration of a run, AdamW and its schedule, checkpoints, the multi-process trainer."""
from mambakit.training.config import ARCHS, TrainConfig, parse_count
from mambakit.training.optim import CosineSchedule, build_optimizer, param_groups
from mambakit.training.trainer import Trainer, TrainingDiverged, lm_loss

__all__ = ["ARCHS", "CosineSchedule", "TrainConfig", "Trainer", "TrainingDiverged", "build_optimizer", "lm_loss", "param_groups",
           "parse_count"]
