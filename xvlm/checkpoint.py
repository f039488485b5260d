"""Weights in and out: official X-VLM checkpoints (safe `torch.load`), and our own safetensors format.

Official checkpoints are `{'model': state_dict, ...}` or a bare state dict, saved from `models.xvlm.XVLMBase`
subclasses. `official_filter_fn` maps their names to ours (timm's `checkpoint_filter_fn` pattern):
    module.*                                  -> (DDP prefix dropped)
    text_encoder.bert.*                       -> text_encoder.*          (pre-training checkpoints wrap BertForMaskedLM)
    text_encoder.cls.predictions.transform.*  -> mlm_head.transform.*
    text_encoder.cls.predictions.bias         -> mlm_head.bias           (decoder weight is tied to word embeddings)
    vision_encoder.*                          -> vision_encoder.backbone.*  (Swin: stage i's downsample -> stage i+1)
Buffers that are derived from the config (`relative_position_index`, `attn_mask`, `position_ids`) are rebuilt, and
`relative_position_bias_table` is resized when the window differs, with the official routine (`xvlm.relpos`), as the
official fine-tuning resizes the 224-px / window-7 pre-trained tables for its 384-px / window-12 model. Every other
key must match exactly: anything missing, unexpected or mis-shaped is reported in one clear error.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import XVLMConfig
from .models import XVLM
from .relpos import resize_rel_pos_table

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "embeddings.position_ids")


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
                value = resize_rel_pos_table(value, ours[key].shape[0], num_extra_tokens=0)   # Swin: no extra rows
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
    state = read_official_state_dict(path)
    heads = detect_heads(state)
    if not heads:
        raise CheckpointError(f"{path} has none of the X-VLM heads (vision_proj, itm_head, bbox_head, mlm)")
    model = XVLM(cfg.with_heads(heads))
    load_state_strict(model, official_filter_fn(state, model), str(path))
    return model.eval()


def save_pretrained(model: XVLM, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not any(b in k for b in DERIVED_BUFFERS)}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "model": "xvlm"})
    (directory / CONFIG_NAME).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")


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
