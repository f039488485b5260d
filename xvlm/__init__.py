"""X-VLM visual grounding: the model, official-checkpoint loading, the Grounder API, training and evaluation."""
from .grounder import Grounder, GroundingResult
from .preprocess import InputError
from .retrieval import retrieval_metrics

__all__ = ["Grounder", "GroundingResult", "InputError", "retrieval_metrics"]
