from .xvlm import XVLM, build_mlp
from .bert import FusionKeysValues, FusionOutput, ImageContext, PackedText
from .vision import VisionEncoder, box_patch_mask, concept_cls, concept_tokens

__all__ = ["XVLM", "build_mlp", "VisionEncoder", "box_patch_mask", "concept_tokens", "concept_cls", "ImageContext",
           "PackedText", "FusionKeysValues", "FusionOutput"]
