"""Training: arguments, recipes, losses, distributed set-up, training state, the Trainer and its entry points."""

from de3bert.training.arguments import TrainingArguments
from de3bert.training.job import TrainingJob
from de3bert.training.launch import resume, train
from de3bert.training.recipes import RECIPES, Recipe, Stage
from de3bert.training.trainer import Trainer, TrainResult

__all__ = ["RECIPES", "Recipe", "Stage", "Trainer", "TrainingArguments", "TrainingJob", "TrainResult", "resume",
           "train"]
