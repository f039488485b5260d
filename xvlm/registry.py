"""The model registry: every named model is a JSON file `model_configs/<name>.json` in `XVLMConfig.to_dict()` form
(the same form as a saved model's config.json), read here.

    list_models()                  every name
    get_model_config(name)         its XVLMConfig (a fresh copy)
    create_model(name_or_config)   an XVLM with fresh random weights

Names: the released X-VLM and X²-VLM checkpoints' configurations (`xvlm-*`, `x2vlm-*`: the built-in presets of
`Grounder.from_official(preset=...)`), the models our recipes train (`shapes*`), the benchmarks' sizes (`bench-*`).
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from .config import XVLMConfig

if TYPE_CHECKING:
    from .models import XVLM

CONFIG_DIR = Path(__file__).with_name("model_configs")
OFFICIAL_PREFIXES = ("xvlm-", "x2vlm-")       # names of the released checkpoints' configurations


@cache
def _names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


def list_models() -> list[str]:
    return list(_names())


def official_models() -> list[str]:
    """The configurations of released checkpoints (what `--preset` accepts)."""
    return [n for n in _names() if n.startswith(OFFICIAL_PREFIXES)]


@cache
def _text(name: str) -> str:
    return (CONFIG_DIR / f"{name}.json").read_text()


def get_model_config(name: str) -> XVLMConfig:
    if name not in _names():
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    return XVLMConfig.from_dict(json.loads(_text(name)))


def create_model(name_or_config: str | XVLMConfig) -> "XVLM":
    """A model by registry name or config, with random weights (load a checkpoint into it, or train it)."""
    from .models import XVLM
    cfg = get_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if not isinstance(cfg, XVLMConfig):
        raise TypeError(f"create_model takes a model name or an XVLMConfig, got {type(name_or_config).__name__}")
    return XVLM(cfg)
