"""Shared fixtures: the official-code fixture models, a tiny random model from the registry, and the loader for the
repository's scripts.

Scopes: a Grounder carries an encoding cache and counters (`stats`) that tests assert on, and some tests change its
settings, so a Grounder fixture is per test module (as each module built its own before); what is only read (the
official state dict, the factories) is per session. A test that changes a grounder beyond restoring it builds its
own with `load_official` / `load_x2vlm` / `make_tiny_grounder`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OFFICIAL = FIXTURES / "official-xvlm-small"          # X-VLM (Swin) written by the unmodified official code
OFFICIAL_X2 = FIXTURES / "official-x2vlm-small"      # X²-VLM (BEiT-2)


# --- official-code fixtures --------------------------------------------------------------------------------------
def _fixture_loader(folder: Path, config: str, tokenizer: str):
    """`load(checkpoint=None, **kw)`: a new Grounder on an official-code fixture folder (its task YAML and tokenizer,
    CPU); keyword arguments override (name=, precision=, config=, ...)."""
    from xvlm import Grounder

    def load(checkpoint=None, **kw):
        kw = {"config": folder / config, "tokenizer": folder / tokenizer, "device": "cpu"} | kw
        return Grounder.from_official(checkpoint or folder / "checkpoint.pth", **kw)
    return load


@pytest.fixture(scope="session")
def load_official():
    """`load_official(checkpoint=None, **kw)`: a new Grounder on the X-VLM fixture (Grounding_bbox.yaml, vocab.txt)."""
    return _fixture_loader(OFFICIAL, "Grounding_bbox.yaml", "vocab.txt")


@pytest.fixture(scope="module")
def official_grounder(load_official):
    """The X-VLM fixture's Grounder, one per test module."""
    return load_official()


@pytest.fixture(scope="session")
def load_x2vlm():
    """`load_x2vlm(checkpoint=None, **kw)`: a new Grounder on the X²-VLM fixture (its grounding YAML and BERT
    folder)."""
    return _fixture_loader(OFFICIAL_X2, "refcoco_grounding.yaml", "bert-base-uncased-tiny")


@pytest.fixture(scope="module")
def x2vlm_grounder(load_x2vlm):
    """The X²-VLM fixture's Grounder, one per test module."""
    return load_x2vlm()


@pytest.fixture(scope="session")
def official_state():
    """The X-VLM fixture checkpoint's state dict as read from disk (treat as read-only: copy before changing)."""
    from xvlm.checkpoint import read_official_state_dict
    return read_official_state_dict(OFFICIAL / "checkpoint.pth")


# --- a tiny random model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def make_tiny_grounder():
    """`make_tiny_grounder(workdir, name=...)`: a Grounder on the registry's `bench-tiny` model (ViT 64 px, 4x4
    patches, BERT of width 32), random weights from seed 0, with a WordPiece vocabulary of the synthetic corpus's
    words written into `workdir`."""
    import dataclasses

    import torch

    from xvlm import Grounder, create_model, get_model_config
    from xvlm.data.synthetic import VOCAB_WORDS
    from xvlm.preprocess import Tokenizer, write_wordpiece_vocab

    def make(workdir: Path, name: str = "tiny (random weights)"):
        vocab = write_wordpiece_vocab(VOCAB_WORDS, Path(workdir) / "vocab-tiny" / "vocab.txt")
        cfg = get_model_config("bench-tiny")
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(
            cfg.text, vocab_size=len(vocab.read_text().splitlines())))
        torch.manual_seed(0)
        return Grounder(create_model(cfg), Tokenizer.for_config(vocab, cfg), device="cpu", name=name)
    return make


# --- the repository's scripts ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def load_script():
    """`load_script("scripts/make_assets.py")`: the script (a path under the repository root) executed as a fresh
    module, registered in sys.modules under `_script_<stem>` (dataclasses look their module up there)."""
    def load(relative: str):
        path = ROOT / relative
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return load
