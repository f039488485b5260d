"""The training code's former home: its public names, now in xvlm.training (one module per concern)."""
from .training.cli import main, parse_stage_steps
from .training.collate import StepBatches, align_probe_batch, collate, distinct_concepts, step_batches, text_id
from .training.loop import (export, lr_at, make_optimizer, save_model_folder, save_training_state, set_seed,
                            set_trainable, setup_distributed, train)
from .training.objective import Pretrainer, align_cross_attention
from .training.recipes import (ALL_KINDS, RECIPES, REFEXP_KINDS, Recipe, Stage, model_config, scaled, second_cycle,
                               with_stage_steps)
from .training.sources import ListSource, SyntheticSource, make_tokenizer

__all__ = ["ALL_KINDS", "ListSource", "Pretrainer", "RECIPES", "REFEXP_KINDS", "Recipe", "Stage", "StepBatches",
           "SyntheticSource", "align_cross_attention", "align_probe_batch", "collate", "distinct_concepts", "export",
           "lr_at", "main", "make_optimizer", "make_tokenizer", "model_config", "parse_stage_steps",
           "save_model_folder", "save_training_state", "scaled", "second_cycle", "set_seed", "set_trainable",
           "setup_distributed", "step_batches", "text_id", "train", "with_stage_steps"]
