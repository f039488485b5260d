"""Full-size X²-VLM layouts: checkpoints with exactly the names, shapes and dtypes of the official base pre-training
model (x2vlm_base_4m/1b.th) and the large RefCOCO+ grounding model, as the official code builds them
(fixtures/official-x2vlm-layouts), load strictly through the public API with the built-in presets and run one
`ground()`. The tensors are zeros expanded from one element, so the files are a few hundred KB on disk and cost no
memory until the model copies them in; only the models themselves (255M and 590M float32 parameters) are real."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder
from xvlm.checkpoint import CheckpointError

torch.set_num_threads(1)
LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "official-x2vlm-layouts" / "layouts.json").read_text())


def zeros_checkpoint(tmp_path: Path, layout: str, drop: str | None = None) -> Path:
    state = {name: torch.zeros((), dtype=getattr(torch, dtype)).expand(shape)
             for name, shape, dtype in LAYOUTS[layout]["state_dict"] if name != drop}
    path = tmp_path / f"{layout}.th"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    """A vocab.txt of bert-base-uncased's size (30522 entries); the words are placeholders."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["the", "red", "circle"] + [f"w{i}" for i in range(30522 - len(words) - 3)]
    path.write_text("\n".join(words) + "\n")
    return path


@pytest.mark.parametrize("layout, preset, heads, grid", [
    ("x2vlm_base_pretrain", "x2vlm-base-4m", ("itc", "itm", "bbox", "mlm"), 14),
    ("x2vlm_large_grounding", "x2vlm-large-1b-grounding", ("bbox",), 24),
])
def test_full_size_official_layout_loads_and_grounds(tmp_path, vocab, layout, preset, heads, grid):
    g = Grounder.from_official(zeros_checkpoint(tmp_path, layout), preset=preset, tokenizer=vocab, device="cpu")
    assert g.model.heads == heads
    ours = sum(p.numel() for p in g.model.parameters())
    # the official model's parameter count (both tie the MLM decoder to the word embeddings: counted once)
    assert ours == LAYOUTS[layout]["parameters"]
    r = g.ground(np.full((48, 64, 3), 90, dtype=np.uint8), "the red circle")
    assert len(r.box_xyxy) == 4 and np.isfinite(r.box_xyxy).all()
    if "itc" in heads:
        assert r.patch_heatmap.shape == (grid, grid)
    else:
        assert r.itc_image is None and set(r.notes) == {"itc", "itm", "found"}   # found: no verdict without ITM


def test_full_size_layout_missing_one_tensor_is_refused(tmp_path, vocab):
    path = zeros_checkpoint(tmp_path, "x2vlm_base_pretrain", drop="vision_encoder.blocks.11.gamma_2")
    with pytest.raises(CheckpointError, match=r"missing \(1\):\s+vision_encoder.backbone.blocks.11.gamma_2"):
        Grounder.from_official(path, preset="x2vlm-base-4m", tokenizer=vocab, device="cpu")
