"""Which models the demo offers, and a registry that loads each one lazily, once, and serialises its use.

A model is described by a `ModelSpec` (cheap: paths only); `ModelRegistry.get(name)` builds the `Grounder` on first
use. The registry is shared by all sessions (models are read-only); per-user state lives in the Gradio session.
Sources, in the order they appear in the selector:
    --model DIR / XVLM_MODEL            a model folder in our format (config.json + model.safetensors + vocab.txt),
                                        or a Hugging Face Hub repo id org/name (--revision / XVLM_REVISION; xvlm.hub)
    --precision / XVLM_PRECISION        fp32 (default) | bf16 | int8, for every model (xvlm.precision)
    --checkpoint FILE / XVLM_CHECKPOINT an official X-VLM / X²-VLM checkpoint, shaped by --config YAML (XVLM_CONFIG) or
                                        --preset NAME (XVLM_PRESET), with --tokenizer vocab.txt (XVLM_TOKENIZER)
    --scorer / XVLM_SCORER, --scorer-checkpoint / XVLM_SCORER_CHECKPOINT
                                        a second model (folder or Hub repo id; official checkpoint) whose ITC/ITM heads
                                        score the boxes of --model / --checkpoint, for box-only models such as the
                                        RefCOCO+ bbox checkpoints
    the shipped default model           weights/xvlm-shapes/ (`Grounder.from_pretrained()`), when present
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xvlm.config import official_family
from xvlm.grounder import DEFAULT_WEIGHTS, Grounder
from xvlm.hub import is_repo_id

from .zerogpu import on_zerogpu

ENV_VARS = ("XVLM_CHECKPOINT", "XVLM_PRESET", "XVLM_CONFIG", "XVLM_TOKENIZER", "XVLM_MODEL", "XVLM_REVISION",
            "XVLM_PRECISION", "XVLM_SCORER", "XVLM_SCORER_CHECKPOINT")
DEFAULT_NAME = "xvlm-shapes (default)"


class ModelUnavailable(RuntimeError):
    """A model could not be found or loaded; the message is meant for the user."""


@dataclass
class ModelSpec:
    name: str
    kind: str                                   # 'pretrained' (our format) or 'official'
    path: str                                   # model folder (pretrained) or checkpoint file (official)
    config: str | None = None                   # official: task YAML
    preset: str | None = None                   # official: built-in preset name
    tokenizer: str | None = None                # official: vocab.txt or its folder
    scorer: str | None = None                   # ITC/ITM for a box-only model: a folder / repo id, or a checkpoint
    kwargs: dict = field(default_factory=dict)  # extra Grounder arguments (e.g. device)

    def problems(self) -> list[str]:
        """What is wrong with this spec before trying to load it (missing files, missing arguments)."""
        out = []
        if self.kind == "pretrained":
            for what, path in (("model", self.path), ("scorer model", self.scorer)):
                hub_id = path is not None and not Path(path).exists() and is_repo_id(path)   # checked when loading
                if path is not None and not hub_id and not (Path(path) / "config.json").is_file():
                    out.append(f"no {what} in {path} (expected config.json, model.safetensors and vocab.txt)")
        elif self.kind == "official":
            if not Path(self.path).is_file():
                out.append(f"checkpoint not found: {self.path}")
            if self.scorer is not None and not Path(self.scorer).is_file():
                out.append(f"scorer checkpoint not found: {self.scorer}")
            if (self.config is None) == (self.preset is None):
                out.append("an official checkpoint needs exactly one of --config (task YAML) or --preset")
            if self.config is not None and not Path(self.config).is_file():
                out.append(f"config not found: {self.config}")
            if self.tokenizer is None:
                out.append("an official checkpoint needs --tokenizer (the bert-base-uncased vocab.txt or its folder)")
            elif not Path(self.tokenizer).exists():
                out.append(f"tokenizer not found: {self.tokenizer}")
        else:
            out.append(f"unknown model kind {self.kind!r}")
        return out

    def load(self) -> Grounder:
        bad = self.problems()
        if bad:
            raise ModelUnavailable(f"model '{self.name}': " + "; ".join(bad))
        if self.kind == "pretrained":
            return Grounder.from_pretrained(self.path, scorer=self.scorer, name=self.name, **self.kwargs)
        return Grounder.from_official(self.path, config=self.config, preset=self.preset, tokenizer=self.tokenizer,
                                      scorer_checkpoint=self.scorer, name=self.name, **self.kwargs)


class ModelRegistry:
    """name -> spec, and name -> loaded Grounder (filled lazily). Thread-safe: one load per model, and `lock(name)`
    serialises inference on one model (the encoding cache and the Grad-CAM hooks are not re-entrant)."""

    def __init__(self, specs: list[ModelSpec] | None = None, grounders: Mapping[str, Grounder] | None = None,
                 compile: bool = False):
        self.compile = compile           # torch.compile each model's vision encoder when it loads (GPU Spaces)
        self._specs: dict[str, ModelSpec] = {s.name: s for s in (specs or [])}
        self._models: dict[str, Grounder] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        for name, g in (grounders or {}).items():
            self.add(name, g)

    def add(self, name: str, grounder: Grounder) -> None:
        """Register an already-built grounder (tests, notebooks)."""
        with self._guard:
            self._models[name] = grounder
            self._locks.setdefault(name, threading.Lock())

    def add_spec(self, spec: ModelSpec) -> None:
        with self._guard:
            self._specs[spec.name] = spec

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([*self._specs, *self._models]))

    @property
    def default(self) -> str | None:
        return self.names[0] if self.names else None

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._specs or name in self._models

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def model_dir(self, name: str | None = None) -> Path | None:
        """The folder of a model in our format (where its eval reports sit beside it); None for official ones."""
        spec = self._specs.get(name or self.default)
        return Path(spec.path) if spec is not None and spec.kind == "pretrained" else None

    def get(self, name: str | None = None) -> Grounder:
        """The grounder called `name` (default: the first one), loading it on first use."""
        name = name or self.default
        if name is None:
            raise ModelUnavailable("no model is configured: " + missing_default_message())
        if name in self._models:
            return self._models[name]
        if name not in self._specs:
            raise ModelUnavailable(f"unknown model {name!r}; available: {', '.join(self.names)}")
        with self.lock(name):          # one loader per model; other models stay usable meanwhile
            if name not in self._models:
                try:
                    g = self._specs[name].load()
                except ModelUnavailable:
                    raise
                except Exception as e:  # a broken file should not take the page down
                    raise ModelUnavailable(f"could not load model '{name}': {type(e).__name__}: {e}") from e
                if self.compile:
                    g.compile_vision()
                if not on_zerogpu():     # there a GPU exists only inside a request (app/zerogpu.py)
                    g.warmup()           # the first user's query should not pay for lazy initialisation
                self._models[name] = g
        return self._models[name]


def missing_default_message() -> str:
    return (f"the default model is not in {DEFAULT_WEIGHTS} (config.json + model.safetensors + vocab.txt). "
            "Train it with `python -m xvlm train`, or start the demo on an official X-VLM checkpoint: "
            "`python app.py --checkpoint checkpoint_best.pth --config Grounding_bbox.yaml --tokenizer vocab.txt` "
            "(or --preset NAME instead of --config; the same via XVLM_CHECKPOINT / XVLM_CONFIG / XVLM_PRESET / "
            "XVLM_TOKENIZER).")


def specs_from_options(checkpoint: str | None = None, preset: str | None = None, config: str | None = None,
                       tokenizer: str | None = None, model: str | None = None,
                       default_weights: str | Path | None = DEFAULT_WEIGHTS, revision: str | None = None,
                       precision: str | None = None, scorer: str | None = None,
                       scorer_checkpoint: str | None = None) -> list[ModelSpec]:
    """The selector's models: the ones named by flags/env vars first (the first one is selected), then the default
    model when its folder exists. `precision` applies to every model; `revision` to a Hub `model`; `scorer` pairs
    with `model`, `scorer_checkpoint` with `checkpoint`."""
    specs = []
    if model:
        hub_id = not Path(model).exists() and is_repo_id(model)
        label = f"{model}{'@' + revision if revision else ''} (Hub)" if hub_id else f"{Path(model).name} (model folder)"
        specs.append(ModelSpec(name=label + _scored_by(scorer), kind="pretrained", path=str(model), scorer=scorer,
                               kwargs={"revision": revision} if hub_id and revision else {}))
    elif revision or scorer:
        raise ModelUnavailable("--revision (XVLM_REVISION) and --scorer (XVLM_SCORER) go with --model (XVLM_MODEL)")
    if checkpoint:
        p = Path(checkpoint)
        label = f"{p.parent.name}/{p.name}" if p.parent.name else p.name
        family = official_family(config, preset)         # the selector tells X-VLM and X²-VLM files apart
        name = f"{label} (official{' ' + family if family else ''})" + _scored_by(scorer_checkpoint)
        specs.append(ModelSpec(name=name, kind="official", path=str(checkpoint), config=config, preset=preset,
                               tokenizer=tokenizer, scorer=scorer_checkpoint))
    elif config or preset or tokenizer or scorer_checkpoint:
        raise ModelUnavailable("--config/--preset/--tokenizer/--scorer-checkpoint (XVLM_CONFIG/XVLM_PRESET/"
                               "XVLM_TOKENIZER/XVLM_SCORER_CHECKPOINT) describe an official checkpoint: give it with "
                               "--checkpoint (XVLM_CHECKPOINT)")
    if default_weights is not None and (Path(default_weights) / "config.json").is_file():
        specs.append(ModelSpec(name=DEFAULT_NAME, kind="pretrained", path=str(default_weights)))
    if precision:
        for s in specs:
            s.kwargs["precision"] = precision
    return specs


def _scored_by(scorer: str | None) -> str:
    """The selector label's note of a paired scorer."""
    return f" + scorer {Path(scorer).name}" if scorer else ""


def options_from_env(env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    env = os.environ if env is None else env
    return {k[len("XVLM_"):].lower(): (env.get(k) or None) for k in ENV_VARS}


__all__ = ["ModelSpec", "ModelRegistry", "ModelUnavailable", "specs_from_options", "options_from_env",
           "missing_default_message", "DEFAULT_NAME", "ENV_VARS"]
