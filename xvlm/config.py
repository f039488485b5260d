"""Model configuration: one dataclass tree, built-in presets as data, and readers for the official YAML + JSON files.

The official code spreads a model's shape over a task YAML (`image_res`, `patch_size`, `embed_dim`, `temp`) and two
JSON files it points to (`vision_config`, `text_config`). We fold them into one `XVLMConfig` so a model can be rebuilt
from a single `config.json` next to its weights.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Preprocessing constants of the official X-VLM code (CLIP's statistics), used for every model here.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("squash", "letterbox")   # VisionConfig.resize; preprocess.Canvas


@dataclass
class VisionConfig:
    kind: str = "swin"                 # 'swin' (official X-VLM) or 'vit' (our small models)
    image_res: int = 384
    patch_size: int = 32               # size of one final-stage token in input pixels (Swin: 4 * 2**(stages-1))
    width: int = 1024                  # channels of the final tokens (official `vision_width`)
    # Swin
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    # ViT
    depth: int = 12
    heads: int = 12
    # 'patch': one linear projection per patch (ViT, official). 'conv': stride-2 3x3 convolutions down to the patch
    # grid (Xiao et al. 2021, "Early convolutions help transformers see better"). Our small ViT trained from scratch
    # learned colour but hardly any shape through a linear patchify: `python -m xvlm eval --probe` reads an object's
    # shape from its concept 37% of the time (majority class 29%); with the conv stem 63% (weights/README.md).
    stem: str = "patch"
    # How an image becomes image_res x image_res: 'squash' (official: bicubic resize, aspect ratio lost) or
    # 'letterbox' (fit and pad with the mean colour, `preprocess.Canvas`). Squashing a 2:1 image halves its
    # horizontal extents, so for our shapes model a square and a rectangle could look the same (weights/README.md).
    resize: str = "squash"

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"vision.resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    @property
    def grid_size(self) -> int:
        return self.image_res // self.patch_size


@dataclass
class TextConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    fusion_layer: int = 6              # layers [0, fusion_layer) are text-only, the rest cross-attend to the image
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1


@dataclass
class XVLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    max_words: int = 30                # pre_caption truncation, as the official grounding evaluation
    max_tokens: int = 40
    # Which heads the model has. Official checkpoints differ here: the RefCOCO+ bbox model has only the box head.
    heads: tuple[str, ...] = ("itc", "itm", "bbox")
    # The not-found verdict (`xvlm.analysis.verdict`), fitted by `python -m xvlm calibrate`: found_score =
    # sigmoid(a * logit(ITM) + b * ITC(region) + c) with found_score_weights (a, b, c), or the ITM probability when
    # None; found when found_score >= found_threshold. None: not calibrated (ITM >= 0.5, and the verdict says so).
    found_threshold: float | None = None
    found_score_weights: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XVLMConfig":
        d = dict(d)
        vision = VisionConfig(**_tuples(d.pop("vision", {})))
        text = TextConfig(**d.pop("text", {}))
        if "heads" in d:
            d["heads"] = tuple(d["heads"])
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(vision=vision, text=text, **d)

    def with_heads(self, heads) -> "XVLMConfig":
        return dataclasses.replace(self, heads=tuple(heads))


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


BERT_BASE = TextConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, fusion_layer=6,
                       num_attention_heads=12, intermediate_size=3072)
SWIN_B_224 = VisionConfig(kind="swin", image_res=224, patch_size=32, width=1024, embed_dim=128,
                          depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7)
SWIN_B_384 = dataclasses.replace(SWIN_B_224, image_res=384, window_size=12)

# The released X-VLM configurations (https://github.com/zengyan-97/X-VLM#checkpoints), as data.
PRESETS: dict[str, XVLMConfig] = {
    # 4M / 16M pre-trained: `4m_base_model_state_step_199999.th`, `16m_base_model_state_step_199999.th`
    "xvlm-base-4m": XVLMConfig(vision=SWIN_B_224, text=BERT_BASE, embed_dim=256, heads=("itc", "itm", "bbox", "mlm")),
    "xvlm-base-16m": XVLMConfig(vision=SWIN_B_224, text=BERT_BASE, embed_dim=256, heads=("itc", "itm", "bbox", "mlm")),
    # RefCOCO+ bbox fine-tuned (`refcoco_bbox/checkpoint_best.pth`): box head only.
    "xvlm-base-refcoco-bbox": XVLMConfig(vision=SWIN_B_384, text=BERT_BASE, heads=("bbox",)),
    # RefCOCO+ weakly-supervised (`refcoco/checkpoint_best.pth`): ITC/ITM heads, no box head.
    "xvlm-base-refcoco-weakly": XVLMConfig(vision=SWIN_B_384, text=BERT_BASE, heads=("itc", "itm")),
}


def get_preset(name: str) -> XVLMConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _resolve(path_str: str, yaml_dir: Path) -> Path:
    """Official YAMLs name files relative to the repository root (`configs/config_bert.json`); ours relative to the
    YAML. Try the YAML's folder, then its parent (the repository root when the YAML sits in `configs/`), then cwd."""
    p = Path(path_str)
    candidates = [p] if p.is_absolute() else [yaml_dir / p, yaml_dir.parent / p, Path.cwd() / p, yaml_dir / p.name]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"config file {path_str!r} not found (looked in {[str(c) for c in candidates]})")


def from_official_yaml(yaml_path: str | Path, heads: tuple[str, ...] | None = None) -> XVLMConfig:
    """Read an official task YAML (e.g. `configs/Grounding_bbox.yaml`) and the JSON configs it points to."""
    yaml_path = Path(yaml_path)
    cfg = yaml.safe_load(yaml_path.read_text())
    if not isinstance(cfg, dict) or "vision_config" not in cfg or "text_config" not in cfg:
        raise ValueError(f"{yaml_path} is not an X-VLM task config (needs vision_config and text_config)")
    if cfg.get("use_clip_vit") or cfg.get("use_roberta"):
        raise NotImplementedError("CLIP-ViT and RoBERTa variants are not supported; use a Swin + BERT config")
    vj = json.loads(_resolve(cfg["vision_config"], yaml_path.parent).read_text())
    tj = json.loads(_resolve(cfg["text_config"], yaml_path.parent).read_text())
    if cfg.get("use_swin", True):
        vision = VisionConfig(kind="swin", image_res=int(cfg["image_res"]), patch_size=int(cfg["patch_size"]),
                              width=int(vj["vision_width"]), embed_dim=int(vj["embed_dim"]),
                              depths=tuple(vj["depths"]), num_heads=tuple(vj["num_heads"]),
                              window_size=int(vj["window_size"]))
        if vj.get("image_res", vision.image_res) != vision.image_res:
            raise ValueError(f"image_res differs between {yaml_path} and its vision config")
    else:
        raise NotImplementedError("only Swin vision configs are supported for official checkpoints")
    text_fields = {f.name for f in dataclasses.fields(TextConfig)}
    text = TextConfig(**{k: v for k, v in tj.items() if k in text_fields})
    if tj.get("hidden_act", "gelu") != "gelu":
        raise NotImplementedError(f"hidden_act {tj['hidden_act']!r} is not supported")
    if heads is None:
        heads = ("bbox",) + (("itc", "itm") if "embed_dim" in cfg else ())
    return XVLMConfig(vision=vision, text=text, embed_dim=int(cfg.get("embed_dim", 256)),
                      temp=float(cfg.get("temp", 0.07)), max_tokens=int(cfg.get("max_tokens", 40)), heads=tuple(heads))
