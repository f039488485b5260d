"""Weights in and out: official X-VLM checkpoints (safe `torch.load`), and our own safetensors format.

Official checkpoints are `{'model': state_dict, ...}` or a bare state dict, saved from `models.xvlm.XVLMBase`
subclasses. `official_filter_fn` maps their names to ours (timm's `checkpoint_filter_fn` pattern):
    module.*                                  -> (DDP prefix dropped)
    text_encoder.bert.*                       -> text_encoder.*          (pre-training checkpoints wrap BertForMaskedLM)
    text_encoder.cls.predictions.transform.*  -> mlm_head.transform.*
    text_encoder.cls.predictions.bias         -> mlm_head.bias           (decoder weight is tied to word embeddings)
    vision_encoder.*                          -> vision_encoder.backbone.*  (Swin: stage i's downsample -> stage i+1)
X²-VLM checkpoints (BEiT-2 vision, `models/beit2.py`) use the same text and head names in both layouts (pre-training:
`text_encoder.bert.*` + `text_encoder.cls.*`; fine-tuned: `text_encoder.*`), and timm's BEiT names for the vision
encoder. Buffers that are derived from the config (`relative_position_index`, `attn_mask`, `position_ids`) are
rebuilt, and `relative_position_bias_table` is resized when the window (Swin) or patch grid (BEiT-2) differs, with
the official routine (`xvlm.relpos`), as the official fine-tuning resizes the 224-px pre-trained tables for its 384-px
model. Every other key must match exactly: anything missing, unexpected or mis-shaped is reported in one clear error.
Before building the model, `infer_config` reads what the state dict's shapes determine (the CLIP way), checks the
config against it, takes the fields the config source cannot know from it, and says which fields the shapes cannot
tell (`LoadReport`, as `model.load_report`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import XVLMConfig
from .models import XVLM
from .models import beit2
from .relpos import resize_rel_pos_table

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "embeddings.position_ids")
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending key."""


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load `.pth`/`.th` with `weights_only=True`: tensors and plain containers only, never arbitrary pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for unsafe globals, RuntimeError for truncated zips, ...
        raise CheckpointError(f"could not load {path} safely (weights_only=True): {e}") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict (expected {{'model': state_dict}} or a bare state dict)")
    return state


def detect_heads(state: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Which X-VLM heads an official state dict carries (the released checkpoints differ here)."""
    keys = {k.removeprefix("module.") for k in state}
    found = {"itc": "vision_proj.weight", "itm": "itm_head.0.weight", "bbox": "bbox_head.0.weight",
             "mlm": "text_encoder.cls.predictions.bias"}
    return tuple(head for head, key in found.items() if key in keys)


def official_filter_fn(state: dict[str, torch.Tensor], model: XVLM) -> dict[str, torch.Tensor]:
    """Rename an official X-VLM state dict to this model's names; drop buffers the model rebuilds itself."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if any(b in key for b in DERIVED_BUFFERS):
            continue
        if key.startswith("text_encoder.cls.predictions."):
            rest = key.removeprefix("text_encoder.cls.predictions.")
            if rest.startswith("decoder."):
                continue  # tied to the word embeddings (weight) and to `bias` (bias)
            key = "mlm_head." + rest
        key = key.replace("text_encoder.bert.", "text_encoder.")
        if key.startswith("vision_encoder."):
            key = "vision_encoder.backbone." + key.removeprefix("vision_encoder.")
            key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
            if key.endswith("relative_position_bias_table") and key in ours and value.shape != ours[key].shape:
                # the official routine; Swin tables are all spatial, BEiT-2's end with 3 cls rows
                extra = beit2.EXTRA_TOKENS if model.cfg.vision.kind == "beit2" else 0
                value = resize_rel_pos_table(value, ours[key].shape[0], num_extra_tokens=extra)
        out[key] = value
    return out


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict` that accounts for every key: one error listing missing, unexpected and mis-shaped keys."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
                       for k in set(ours) & set(state) if state[k].shape != ours[k].shape)
    if missing or unexpected or misshaped:
        def block(title, items):
            shown = "\n    ".join(items[:25]) + (f"\n    ... and {len(items) - 25} more" if len(items) > 25 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""
        raise CheckpointError(f"{source} does not fit the model:" + block("missing", missing)
                              + block("unexpected", unexpected) + block("mis-shaped", misshaped))
    model.load_state_dict(state, strict=True)


def load_official(path: str | Path, cfg: XVLMConfig) -> XVLM:
    """Build an XVLM with the heads the checkpoint carries and load it strictly."""
    return load_official_state(read_official_state_dict(path), cfg, str(path))


def load_official_state(state: dict[str, torch.Tensor], cfg: XVLMConfig, source: str = "checkpoint") -> XVLM:
    """`load_official` on a state dict already in memory. What the checkpoint's shapes said about the config, and
    what they could not say, is `model.load_report` (and one log line)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    cfg, report = infer_config(cfg, state, source)
    model = build_uninitialised(cfg)
    load_state_strict(model, official_filter_fn(state, model), source)
    model.load_report = report
    log.info("%s", report.summary())
    return model.eval()


def build_uninitialised(cfg: XVLMConfig) -> XVLM:
    """`XVLM(cfg)` without the random initialisation that a strict load overwrites anyway (most of a large model's
    build time: 12 of 13 s for X²-VLM large on one CPU thread): built on the meta device, materialised empty on the
    CPU, then the buffers no checkpoint carries (timm's relative_position_index, k_bias, attn_mask) are computed by
    timm's `init_non_persistent_buffers`. Any other non-persistent buffer: an ordinary build instead."""
    with torch.device("meta"):
        model = XVLM(cfg)
    model.to_empty(device="cpu")
    persistent, owners = set(model.state_dict()), set()
    for name, module in model.named_modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
            owners.add(name)
    if any(n not in persistent and n.rpartition(".")[0] not in owners for n, _ in model.named_buffers()):
        return XVLM(cfg)
    return model


@dataclass(frozen=True)
class LoadReport:
    """What an official checkpoint's shapes said about its configuration (the CLIP way: `clip.build_model` reads
    every size from the state dict). `read`: each config field the shapes determine, with its value (the config
    agreed, or took the checkpoint's value where `adopted` says so). `adopted`: field -> (the config's value, the
    checkpoint's), where the config source cannot know (which heads a file carries; BEiT-2 depth and heads, which the
    official code picks by a file name's word base/large). `not_inferred`: field -> why the shapes cannot tell it;
    the config's value is used."""
    source: str
    read: dict[str, Any]
    adopted: dict[str, tuple[Any, Any]]
    not_inferred: dict[str, str]

    def summary(self) -> str:
        taken = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in self.adopted.items()) or "nothing"
        return (f"{self.source}: {len(self.read)} config fields read from the checkpoint's shapes (taken from it: "
                f"{taken}); from the config, not inferable: {', '.join(self.not_inferred)}")


# Config fields no official state dict determines, and why (the config's value is used).
NOT_INFERABLE = {
    "text.num_attention_heads": "query/key/value weights are square: every divisor of the width fits",
    "text.layer_norm_eps": "not stored in the weights",
    "max_tokens": "text preprocessing, not in the weights",
    "max_words": "text preprocessing, not in the weights",
    "punctuation": "text preprocessing, not in the weights",
    "append_sep": "text preprocessing, not in the weights",
}
NOT_INFERABLE_VISION = {
    "swin": {"vision.image_res": "no absolute position table; the attention masks are rebuilt for the config's size",
             "vision.window_size": "relative position tables are resized to the config's window (the official "
                                   "fine-tuning load does the same)"},
    "beit2": {"vision.image_res": "no absolute position table; relative position tables are resized to the config's "
                                  "patch grid"},
}


def shapes_from_state(state: dict[str, torch.Tensor], kind: str) -> dict[str, Any]:
    """Config fields (dotted names) an official state dict determines by its tensors' shapes: text sizes, the
    fusion start, the ITC dimension, the vision encoder's sizes, and which heads it carries."""
    state = {k.removeprefix("module.").replace("text_encoder.bert.", "text_encoder."): v for k, v in state.items()}
    read: dict[str, Any] = {"heads": detect_heads(state)}
    words = state.get("text_encoder.embeddings.word_embeddings.weight")
    if words is not None:
        read["text.vocab_size"], read["text.hidden_size"] = (int(n) for n in words.shape)
    for field_, key in (("text.max_position_embeddings", "position_embeddings"),
                        ("text.type_vocab_size", "token_type_embeddings")):
        if (t := state.get(f"text_encoder.embeddings.{key}.weight")) is not None:
            read[field_] = int(t.shape[0])
    layers = {int(m.group(1)) for k in state if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", k))}
    if layers:
        read["text.num_hidden_layers"] = max(layers) + 1
        fusion = sorted(int(m.group(1)) for k in state
                        if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.self\.key\.weight", k)))
        if fusion:
            read["text.fusion_layer"] = fusion[0]
            read["vision.width"] = int(state[f"text_encoder.encoder.layer.{fusion[0]}.crossattention.self.key.weight"]
                                       .shape[1])
        if (t := state.get("text_encoder.encoder.layer.0.intermediate.dense.weight")) is not None:
            read["text.intermediate_size"] = int(t.shape[0])
    if (t := state.get("vision_proj.weight")) is not None:
        read["embed_dim"] = int(t.shape[0])
    blocks: dict[int, set[int]] = {}
    for k in state:
        if m := re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if kind == "swin" and blocks and (t := state.get("vision_encoder.patch_embed.proj.weight")) is not None:
        stages = range(len(blocks))
        read["vision.embed_dim"] = int(t.shape[0])
        read["vision.depths"] = tuple(len(blocks[i]) for i in stages)
        read["vision.num_heads"] = tuple(
            int(state[f"vision_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in stages)
        read["vision.patch_size"] = int(t.shape[-1]) * 2 ** (len(blocks) - 1)
    elif kind == "beit2":
        try:
            shape = beit2.shape_from_state(state)
        except KeyError:
            shape = {}
        read |= {f"vision.{k}": v for k, v in shape.items()}
    return read


# Fields the checkpoint decides over the config (see LoadReport.adopted), besides which heads it carries.
ADOPTED = {"beit2": ("vision.depth", "vision.num_heads")}


def infer_config(cfg: XVLMConfig, state: dict[str, torch.Tensor],
                 source: str = "checkpoint") -> tuple[XVLMConfig, LoadReport]:
    """`cfg` checked against (and, for the `ADOPTED` fields, completed from) an official state dict's shapes. A field
    the shapes determine and the config gets wrong is an error naming both values (a wrong config, not a guess)."""
    kind = cfg.vision.kind
    read = shapes_from_state(state, kind)
    if not read["heads"]:
        raise CheckpointError(f"{source} has none of the X-VLM heads (vision_proj, itm_head, bbox_head, mlm)")
    if kind == "beit2" and "vision.depth" not in read:
        raise CheckpointError(f"{source} does not fit a BEiT-2 config: no BEiT-2 vision encoder under "
                              f"'vision_encoder.' (blocks.N.{beit2.TABLE_SUFFIX}, patch_embed.proj)")
    adopted, wrong, values = {}, [], {}
    for name, value in read.items():
        ours = _get(cfg, name)
        if ours == value or (name == "heads" and set(ours) == set(value)):
            continue
        if name == "heads" or name in ADOPTED.get(kind, ()):
            adopted[name], values[name] = (ours, value), value
        else:
            wrong.append(f"{name}: the checkpoint has {value}, the config says {ours}")
    if wrong:
        raise CheckpointError(f"{source} does not fit the config:\n  " + "\n  ".join(wrong))
    vision = {k.removeprefix("vision."): v for k, v in values.items() if k.startswith("vision.")}
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision)).with_heads(read["heads"])
    not_inferred = NOT_INFERABLE_VISION.get(kind, {}) | NOT_INFERABLE
    return cfg, LoadReport(source, read, adopted, not_inferred)


def _get(cfg: XVLMConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return tuple(obj) if isinstance(obj, list) else obj


def save_pretrained(model: XVLM, directory: str | Path, vocab: str | Path | None = None) -> None:
    """Our format: `model.safetensors` + `config.json`; `vocab`, the tokenizer's vocab.txt, is copied in beside them
    so the folder loads on its own (`load_pretrained`, `Grounder.from_pretrained`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not any(b in k for b in DERIVED_BUFFERS)}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "model": "xvlm"})
    (directory / CONFIG_NAME).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    if vocab is not None:
        shutil.copyfile(vocab, directory / "vocab.txt")


def state_for_grid(src: XVLM, dst: XVLM) -> dict[str, torch.Tensor]:
    """`src`'s weights for `dst`, a model of the same shapes but another ViT image size: the absolute position table is
    resampled to `dst`'s patch grid (timm's `resample_abs_pos_embed`, bicubic: how ViTs are fine-tuned at a higher
    resolution, and how X-VLM goes from 224 to 384 px). Every other tensor is returned as it is, so a strict load
    (`load_state_strict`) still refuses any other difference."""
    state = dict(src.state_dict())
    key = "vision_encoder.backbone.pos_embed"
    if key in state and src.cfg.vision.kind == "vit" and src.cfg.vision.grid_size != dst.cfg.vision.grid_size:
        from timm.layers import resample_abs_pos_embed
        g0, g1 = src.cfg.vision.grid_size, dst.cfg.vision.grid_size
        state[key] = resample_abs_pos_embed(state[key], new_size=[g1, g1], old_size=[g0, g0], num_prefix_tokens=0)
    return state


def load_pretrained(directory: str | Path) -> XVLM:
    """Our format: `config.json` + `model.safetensors` (+ tokenizer files, read by the tokenizer)."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: a model folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        cfg = XVLMConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model config {cfg_path}: {e}") from e
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupted or truncated weights file {weights_path}: {e}") from e
    model = XVLM(cfg)
    load_state_strict(model, state, str(weights_path))
    return model.eval()
