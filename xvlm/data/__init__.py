"""Training data: procedural multi-grained scenes (synthetic) and readers for the official X-VLM JSON formats."""
from .adapters import Concept, TrainingSample, training_sample
from .official import Sample, load_grounding_json, load_image_text_json, load_region_json, scene_to_sample
from .synthetic import (COLORS, SHAPES, VOCAB_WORDS, Desc, Phrase, RefSpec, RenderStyle, Scene, SceneObject,
                        generate_scene, iter_scenes, resolve, sample_render_style)

__all__ = ["COLORS", "SHAPES", "VOCAB_WORDS", "Concept", "Desc", "Phrase", "RefSpec", "RenderStyle", "Scene",
           "SceneObject", "Sample", "TrainingSample", "generate_scene", "iter_scenes", "load_grounding_json",
           "load_image_text_json", "load_region_json", "resolve", "sample_render_style", "scene_to_sample",
           "training_sample"]
