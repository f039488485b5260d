"""Training, one module per concern:

- recipes:   `Recipe` / `Stage` and `RECIPES` (data; a recipe names its model), step-count helpers
- sources:   where samples come from (`SyntheticSource`, `ListSource`) and the run's tokenizer
- collate:   training samples -> batches of (visual concept, text) pairs; the stream of a run's batches
- objective: the per-stage losses (`Pretrainer`) and the cross-attention alignment
- loop:      `train()`: run folder, DDP, per-stage optimizers, checkpoints, resume, --max-minutes, export
- cli:       `python -m xvlm train`
"""
from .loop import train
from .recipes import RECIPES, Recipe, Stage, model_config

__all__ = ["RECIPES", "Recipe", "Stage", "model_config", "train"]
