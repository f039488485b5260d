"""X-VLM visual grounding: the model, official-checkpoint loading, the Grounder API, training and evaluation."""
from .grounder import Grounder, GroundingResult
from .preprocess import InputError
from .registry import create_model, get_model_config, list_models
from .retrieval import retrieval_metrics

__all__ = ["Grounder", "GroundingResult", "InputError", "create_model", "get_model_config", "list_models",
           "retrieval_metrics"]
