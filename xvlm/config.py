"""Model configuration: one dataclass tree (a vision section per encoder family), and readers for the official YAML
+ JSON files. The named models are data: `xvlm/model_configs/<name>.json`, read by `xvlm.registry`.

The official code spreads a model's shape over a task YAML (`image_res`, `patch_size`, `embed_dim`, `temp`) and two
JSON files it points to (`vision_config`, `text_config`). We fold them into one `XVLMConfig` so a model can be rebuilt
from a single `config.json` next to its weights.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Preprocessing constants of the official X-VLM code (CLIP's statistics), used for every model here.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("squash", "letterbox")   # VisionConfig.resize; preprocess.Canvas
CONVERT_MODES = ("official", "composite")   # VisionConfig.convert; preprocess.to_rgb
PUNCTUATION_MODES = ("delete", "space")  # XVLMConfig.punctuation; preprocess.pre_caption
TRUNCATION_MODES = ("max_tokens", "positions")   # XVLMConfig.grounding_truncation; preprocess.Tokenizer.for_config


@dataclass
class VisionConfig:
    """What every vision encoder has. A family's own fields live in its subclass (`VISION_FAMILIES`, chosen by
    `kind`), so a new family is one class more and the others do not change."""
    kind: str = field(default="", init=False)
    image_res: int = 384
    patch_size: int = 32               # size of one final-stage token in input pixels (Swin: 4 * 2**(stages-1))
    width: int = 1024                  # channels of the final tokens (official `vision_width`)
    # How an image becomes image_res x image_res: 'squash' (official: bicubic resize, aspect ratio lost) or
    # 'letterbox' (fit and pad with the mean colour, `preprocess.Canvas`). Squashing a 2:1 image halves its
    # horizontal extents, so for our shapes model a square and a rectangle could look the same (weights/README.md).
    resize: str = "squash"
    # How a decoded file becomes RGB: 'official' is exactly the official reading, `Image.open(p).convert('RGB')`
    # (alpha dropped, EXIF orientation ignored, 16-bit values clipped by Pillow), so official checkpoints see what the
    # official code sees for every file; 'composite' applies EXIF orientation, composites alpha on white and scales
    # 16-bit to 8 bits (what an image viewer shows). `preprocess.to_rgb`.
    convert: str = "official"

    def __post_init__(self):
        if type(self) is VisionConfig:
            raise TypeError(f"VisionConfig is the part every family shares: build one of "
                            f"{[c.__name__ for c in VISION_FAMILIES.values()]} or VisionConfig.from_dict")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"vision.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.convert not in CONVERT_MODES:
            raise ValueError(f"vision.convert must be one of {CONVERT_MODES}, got {self.convert!r}")

    @property
    def grid_size(self) -> int:
        return self.image_res // self.patch_size

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "VisionConfig":
        """The family's class for `d["kind"]` (default 'swin'). Also reads the single table that config.json files
        had before the per-family sections (`legacy_vision_dict`): the other families' fields are dropped, and a
        ViT's or BEiT-2's `heads` is its `num_heads`."""
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        kind = d.pop("kind", "swin")
        if kind not in VISION_FAMILIES:
            raise ValueError(f"unknown vision encoder kind {kind!r}; known: {sorted(VISION_FAMILIES)}")
        family = VISION_FAMILIES[kind]
        own = {f.name for f in dataclasses.fields(family) if f.init}
        if "heads" in d and kind != "swin":
            d["num_heads"] = d["heads"]
        d = {k: v for k, v in d.items() if k in own or k not in _LEGACY_FIELDS}
        unknown = set(d) - own
        if unknown:
            raise ValueError(f"unknown {kind} vision config keys: {sorted(unknown)}")
        return family(**d)


@dataclass
class SwinVisionConfig(VisionConfig):
    """Swin (official X-VLM): `embed_dim` channels after the 4x4 patchify, doubled by each of the stages."""
    kind: str = field(default="swin", init=False)
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)     # attention heads per stage
    window_size: int = 12


@dataclass
class ViTVisionConfig(VisionConfig):
    """ViT (our small models; timm's VisionTransformer): width = embed dim, 2-D sin-cos positions to start from."""
    kind: str = field(default="vit", init=False)
    depth: int = 12
    num_heads: int = 12
    # 'patch': one linear projection per patch (ViT, official). 'conv': stride-2 3x3 convolutions down to the patch
    # grid (Xiao et al. 2021, "Early convolutions help transformers see better"): a patch's token sees its
    # neighbours' edges, which a linear patchify cannot (weights/README.md: what it did for reading shapes).
    stem: str = "patch"


@dataclass
class Beit2VisionConfig(VisionConfig):
    """BEiT-2 (official X²-VLM; timm's Beit with per-block relative position bias, layer scale, q/v biases, no absolute
    position embedding): width = embed dim. The official code picks depth and heads by the word base/large in a file
    name; `checkpoint.infer_config` reads them from the checkpoint."""
    kind: str = field(default="beit2", init=False)
    depth: int = 12
    num_heads: int = 12


VISION_FAMILIES: dict[str, type[VisionConfig]] = {
    "swin": SwinVisionConfig, "vit": ViTVisionConfig, "beit2": Beit2VisionConfig}

# The single vision table of config.json files written before the per-family sections, with its defaults.
_LEGACY_FIELDS = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "window_size": 12,
                  "depth": 12, "heads": 12, "stem": "patch"}


def legacy_vision_dict(vision: VisionConfig) -> dict[str, Any]:
    """`vision` as the single table config.json files had before the per-family sections (every family's fields, the
    others at their defaults; a ViT's or BEiT-2's attention heads as `heads`). `xvlm.index` fingerprints models by it,
    so a gallery index keeps matching the model that built it."""
    own = dataclasses.asdict(vision)
    flat = {k: own.pop(k) for k in ("kind", "image_res", "patch_size", "width")}
    if vision.kind != "swin":
        own["heads"] = own.pop("num_heads")
    flat.update({k: own.get(k, default) for k, default in _LEGACY_FIELDS.items()})
    flat.update(resize=own["resize"], convert=own["convert"])
    return flat


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
    vision: VisionConfig = field(default_factory=SwinVisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    max_words: int = 30                # pre_caption truncation, as the official grounding evaluation
    max_tokens: int = 40
    # Which heads (by name, `models.xvlm.HEADS`) the model has. Official checkpoints differ here: the RefCOCO+ bbox model has only the box head.
    heads: tuple[str, ...] = ("itc", "itm", "bbox")
    # Text preprocessing of the model family. X-VLM's pre_caption deletes punctuation and its tokenizer gives
    # `[CLS] tokens`; X²-VLM's pre_caption replaces punctuation by a space and its tokenizer appends [SEP].
    punctuation: str = "delete"        # 'delete' or 'space'
    append_sep: bool = False
    # Where grounding cuts a long phrase: at `max_tokens` (the training bound; our models) or only at the position
    # table ("positions": the official grounding evaluations do not truncate; every official checkpoint). Retrieval
    # always truncates at `max_tokens`, as the official Retrieval.py does.
    grounding_truncation: str = "max_tokens"
    # The closed training vocabulary (whole words) of a model trained on a closed corpus, such as the shapes model:
    # words outside it are unknown to the model even when WordPiece splits them into known pieces
    # (`xvlm.vocabulary`). None: an open vocabulary, where a word is unknown when it becomes [UNK].
    words: tuple[str, ...] | None = None
    # The not-found verdict (`xvlm.analysis.verdict`), fitted by `python -m xvlm calibrate`: found_score =
    # sigmoid(a * logit(ITM) + b * ITC(region) + c) with found_score_weights (a, b, c), or the ITM probability when
    # None; found when found_score >= found_threshold. None: not calibrated (ITM >= 0.5, and the verdict says so).
    found_threshold: float | None = None
    found_score_weights: tuple[float, float, float] | None = None
    # How many ITC candidates `search` re-ranks by the ITM logit when the caller does not say: 16, the official
    # protocol (k_test, clamped to the gallery), unless a model's card shows its ITM head ranks worse than its ITC
    # (the shipped shapes model: 0, ITC only; weights/README.md, "Retrieval with X-VLM's protocol").
    search_rerank: int = 16

    def __post_init__(self):
        if self.punctuation not in PUNCTUATION_MODES:
            raise ValueError(f"punctuation must be one of {PUNCTUATION_MODES}, got {self.punctuation!r}")
        if self.grounding_truncation not in TRUNCATION_MODES:
            raise ValueError(f"grounding_truncation must be one of {TRUNCATION_MODES}, "
                             f"got {self.grounding_truncation!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XVLMConfig":
        d = dict(d)
        vision = VisionConfig.from_dict(d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        if "heads" in d:
            d["heads"] = tuple(d["heads"])
        if d.get("words") is not None:
            d["words"] = tuple(d["words"])
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(vision=vision, text=text, **d)

    def with_heads(self, heads) -> "XVLMConfig":
        return dataclasses.replace(self, heads=tuple(heads))


class _Presets(Mapping):
    """The official checkpoints' configurations by name: a read-only view of the model registry (`xvlm.registry`),
    each lookup a fresh copy."""

    def __getitem__(self, name: str) -> "XVLMConfig":
        if name not in self.names():
            raise KeyError(name)
        from .registry import get_model_config
        return get_model_config(name)

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    @staticmethod
    def names() -> list[str]:
        from .registry import official_models
        return official_models()


PRESETS: Mapping[str, "XVLMConfig"] = _Presets()

# X²-VLM's text preprocessing (pre_caption replaces punctuation by a space; the tokenizer appends [SEP]).
X2_TEXT = {"punctuation": "space", "append_sep": True}


def model_family(cfg: XVLMConfig) -> str:
    """The system a configuration belongs to, for people to read: X²-VLM (BEiT-2 vision) or X-VLM."""
    return "X²-VLM" if cfg.vision.kind == "beit2" else "X-VLM"


def official_family(config: str | Path | None = None, preset: str | None = None) -> str | None:
    """The family of an official checkpoint's `config` (task YAML) or `preset`, without reading anything else;
    None when it cannot be told (unreadable YAML, unknown preset: loading reports those)."""
    if preset is not None:
        return model_family(PRESETS[preset]) if preset in PRESETS else None
    try:
        task = yaml.safe_load(Path(config).read_text())
    except (OSError, TypeError, yaml.YAMLError):
        return None
    return None if not isinstance(task, dict) else "X²-VLM" if task.get("use_beit_v2") else "X-VLM"


def get_preset(name: str) -> XVLMConfig:
    """An official checkpoint's configuration (a fresh copy)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _resolve(path_str: str, yaml_dir: Path) -> Path:
    """Official YAMLs name files relative to the repository root (`configs/config_bert.json`); ours relative to the
    YAML. Try the YAML's folder, then its parent (the repository root when the YAML sits in `configs/`), then cwd, then
    its grandparent (X²-VLM's task YAMLs sit in `configs/finetune/` and `configs/pretrain/`)."""
    p = Path(path_str)
    candidates = [p] if p.is_absolute() else [yaml_dir / p, yaml_dir.parent / p, Path.cwd() / p, yaml_dir / p.name,
                                              yaml_dir.parent.parent / p]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"config file {path_str!r} not found (looked in {[str(c) for c in candidates]})")


def from_official_yaml(yaml_path: str | Path, heads: tuple[str, ...] | None = None) -> XVLMConfig:
    """Read an official task YAML (e.g. `configs/Grounding_bbox.yaml`) and the JSON configs it points to. An X²-VLM
    YAML (`use_beit_v2: True`) is read by `x2vlm_from_official_yaml`."""
    yaml_path = Path(yaml_path)
    cfg = yaml.safe_load(yaml_path.read_text())
    if isinstance(cfg, dict) and cfg.get("use_beit_v2"):
        return x2vlm_from_official_yaml(yaml_path, cfg, heads)
    if not isinstance(cfg, dict) or "vision_config" not in cfg or "text_config" not in cfg:
        raise ValueError(f"{yaml_path} is not an X-VLM task config (needs vision_config and text_config)")
    if cfg.get("use_clip_vit") or cfg.get("use_roberta"):
        raise NotImplementedError("CLIP-ViT and RoBERTa variants are not supported; use a Swin + BERT config")
    vj = json.loads(_resolve(cfg["vision_config"], yaml_path.parent).read_text())
    tj = json.loads(_resolve(cfg["text_config"], yaml_path.parent).read_text())
    if cfg.get("use_swin", True):
        vision = SwinVisionConfig(image_res=int(cfg["image_res"]), patch_size=int(cfg["patch_size"]),
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


# The official BEiT-2 presets (`models/beit2.py beit_{base,large}_patch16`), chosen by the official code from the
# word base/large in the vision config's file name. `checkpoint.infer_config` replaces depth and heads by what a
# checkpoint's shapes say.
BEIT2_SIZES = {"base": {"depth": 12, "num_heads": 12}, "large": {"depth": 24, "num_heads": 16}}


def x2vlm_from_official_yaml(yaml_path: Path, cfg: dict, heads: tuple[str, ...] | None = None) -> XVLMConfig:
    """An X²-VLM task YAML: `vision_config` JSON ({ckpt, vision_width, patch_size}), the `text_encoder` folder's BERT
    `config.json` with `text_num_hidden_layers` (text + fusion layers) and `text_fusion_start_at`."""
    for key in ("vision_config", "text_encoder", "image_res", "patch_size", "text_num_hidden_layers",
                "text_fusion_start_at"):
        if key not in cfg:
            raise ValueError(f"{yaml_path} is not an X²-VLM task config (no {key!r})")
    if cfg.get("use_clip_vit") or cfg.get("use_swin") or "roberta" in str(cfg["text_encoder"]):
        raise NotImplementedError("only the BEiT-2 + BERT variant of X²-VLM is supported")
    vision_file = _resolve(cfg["vision_config"], yaml_path.parent)
    vj = json.loads(vision_file.read_text())
    if "vision_width" not in vj or int(vj.get("patch_size", cfg["patch_size"])) != int(cfg["patch_size"]):
        raise ValueError(f"{vision_file} is not a BEiT-2 vision config for {yaml_path.name} (vision_width, patch_size "
                         f"{cfg['patch_size']})")
    # neither word in the name: the official code refuses; the checkpoint's shapes decide anyway
    size = next((v for k, v in BEIT2_SIZES.items() if k in str(cfg["vision_config"])), BEIT2_SIZES["base"])
    vision = Beit2VisionConfig(image_res=int(cfg["image_res"]), patch_size=int(cfg["patch_size"]),
                               width=int(vj["vision_width"]), **size)
    tj = json.loads(_resolve(str(Path(cfg["text_encoder"]) / "config.json"), yaml_path.parent).read_text())
    if tj.get("hidden_act", "gelu") != "gelu":
        raise NotImplementedError(f"hidden_act {tj['hidden_act']!r} is not supported")
    text_fields = {f.name for f in dataclasses.fields(TextConfig)}
    text = TextConfig(**{k: v for k, v in tj.items() if k in text_fields} | {
        "num_hidden_layers": int(cfg["text_num_hidden_layers"]), "fusion_layer": int(cfg["text_fusion_start_at"])})
    if heads is None:
        heads = ("bbox",) + (("itc", "itm") if "embed_dim" in cfg else ())
    # max_words: the grounding dataset's default (the pre-training YAMLs' max_words is their training value)
    return XVLMConfig(vision=vision, text=text, embed_dim=int(cfg.get("embed_dim", 256)),
                      temp=float(cfg.get("temp", 0.07)), max_tokens=int(cfg.get("max_tokens", 40)), heads=tuple(heads),
                      **X2_TEXT)
