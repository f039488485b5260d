"""Regression guards for the demo's latency design (no timings): the vision encoder runs once per image, N phrases
share ONE batched text/fusion pass, the image's cross-attention keys/values are projected once per image, and
`python -m xvlm bench` runs end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xvlm import Grounder, bench
from xvlm.preprocess import Tokenizer

torch.set_num_threads(1)   # 2 shared cores: intra-op threads only contend
REPO = Path(__file__).resolve().parent.parent
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
X2 = Path(__file__).parent / "fixtures" / "official-x2vlm-small"
PHRASES = bench.PHRASES[:5]


@pytest.fixture(scope="module")
def models(tmp_path_factory, load_official, load_x2vlm):
    tmp = tmp_path_factory.mktemp("bench-models")
    tiny = bench.tiny_grounder("cpu", tmp)           # the benchmark's own tiny model (what `--models tiny` times)
    official = load_official()
    x2 = load_x2vlm()                                 # X²-VLM: same cache paths
    return {"tiny": tiny, "official-small": official, "official-x2-small": x2}


@pytest.fixture(params=["tiny", "official-small", "official-x2-small"])
def g(request, models) -> Grounder:
    """A fresh Grounder (empty cache, zero counters) around the module's model."""
    base = models[request.param]
    return Grounder(base.model, base.tokenizer, device="cpu")


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    return bench.write_synthetic_image(tmp_path_factory.mktemp("img") / "scene.png", size=(96, 64))


class Calls:
    """Records the batch size (first dim of the first tensor argument) of every forward of a module."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[tuple[int, ...]] = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batches.append(tuple(args[0].shape)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- the vision encoder runs once per image -----------------------------------------------------------------------
def test_vision_encoder_runs_once_for_many_phrases_and_any_input_type(g, png):
    with Calls(g.model.vision_encoder) as vision:
        results = g.ground(png, PHRASES)
        assert len(results) == len(PHRASES)
        assert len(vision.batches) == 1 and g.stats["vision_passes"] == 1

        pil = Image.open(png)
        for same_image in (png, str(png), pil, pil.copy(), np.asarray(pil.convert("RGB")), png):
            g.ground(same_image, PHRASES[1])
            g.ground(same_image, PHRASES[:3])
        assert len(vision.batches) == 1 and g.stats["vision_passes"] == 1, "a cached image was encoded again"

        other = np.asarray(pil.convert("RGB")).copy()
        other[0, 0] = 255 - other[0, 0]                    # one pixel differs: a different image
        g.ground(other, PHRASES[0])
        assert len(vision.batches) == 2 and g.stats["vision_passes"] == 2


def test_concept_scores_reuse_the_cached_encoding(models, png):
    base = models["official-small"]
    g = Grounder(base.model, base.tokenizer, device="cpu")
    r = g.ground(png, PHRASES[:2])
    with Calls(g.model.vision_encoder) as vision:
        g.concept_scores(png, PHRASES[:2], [x.box_xyxy for x in r])
    assert vision.batches == [] and g.stats["vision_passes"] == 1


# --- N phrases: one packed text/fusion pass -----------------------------------------------------------------------
def test_phrases_share_one_packed_fusion_pass_without_padding(g, png, monkeypatch):
    """All N phrases go through the text and fusion layers as ONE sequence of exactly their tokens (no padding to
    the longest), and the heads read one [CLS] per phrase. The text layers run once per query, although the box,
    ITM and ITC all read the text encoding (benchmarks/RESULTS.md, gap 1)."""
    te = g.model.text_encoder
    fuse_shapes = []
    real_fuse = te.fuse

    def counting_fuse(text_embeds, *args, **kw):
        fuse_shapes.append(tuple(text_embeds.shape[:2]))
        return real_fuse(text_embeds, *args, **kw)

    monkeypatch.setattr(te, "fuse", counting_fuse)        # instance attribute: XVLM.fuse calls it
    g.ground(png, PHRASES[0])                             # fill the cache; count the cached query only
    fuse_shapes.clear()
    n = len(PHRASES)
    lengths = g.tokenizer(PHRASES).attention_mask.sum(dim=1)
    assert lengths.min() < lengths.max()                  # the phrases differ in length: padding would show
    heads = [getattr(g.model, h) for h in ("bbox_head", "itm_head") if hasattr(g.model, h)]
    hooks = [Calls(h) for h in heads]
    fusion = [Calls(layer) for layer in te.fusion_layers]
    text = [Calls(layer) for layer in te.encoder.layer[: te.config.fusion_layer]]
    try:
        g.ground(png, PHRASES)
    finally:
        for c in hooks + fusion + text:
            c.handle.remove()
    assert text and all([b[:2] for b in c.batches] == [(1, int(lengths.sum()))] for c in text), \
        "the text layers must run once per query, on the packed phrases"
    assert fuse_shapes == [(1, int(lengths.sum()))], f"expected one packed pass of {int(lengths.sum())} tokens"
    for c in hooks:
        assert [b[0] for b in c.batches] == [n]
    for c in fusion:
        assert [b[:2] for b in c.batches] == [(1, int(lengths.sum()))]


def test_packed_text_equals_the_padded_batch(g):
    """Packing is a layout, not an approximation: every phrase's text and fused [CLS] match the padded batch; so
    does a last fusion layer that computes only the [CLS] rows."""
    from xvlm.models import ImageContext, PackedText
    m = g.model
    text = g.tokenizer(PHRASES)
    packed = PackedText.of(text.input_ids, text.attention_mask)
    tokens = m.encode_image(torch.randn(1, 3, m.cfg.vision.image_res, m.cfg.vision.image_res))
    with torch.inference_mode():
        padded_text = m.encode_text(text.input_ids, text.attention_mask)
        padded = m.fuse(padded_text, text.attention_mask, ImageContext.single(tokens, len(PHRASES)))[:, 0]
        packed_text = m.encode_text(packed.input_ids, packed.attention_mask, packed.position_ids)
        fused = m.fuse(packed_text, packed.attention_mask, ImageContext.single(tokens, 1))
        cls_only = m.fuse(packed_text, packed.attention_mask, ImageContext.single(tokens, 1), last_rows=packed.starts)
        padded_cls_only = m.fuse(padded_text, text.attention_mask, ImageContext.single(tokens, len(PHRASES)),
                                 last_rows=torch.tensor([0]))
    torch.testing.assert_close(packed.firsts(packed_text)[:, 0], padded_text[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.firsts(fused)[:, 0], padded, atol=1e-5, rtol=1e-4)
    # the last layer computing only the [CLS] rows changes nothing in them
    assert cls_only.shape == (1, len(PHRASES), m.cfg.text.hidden_size)
    torch.testing.assert_close(cls_only[0], padded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded_cls_only[:, 0], padded, atol=1e-5, rtol=1e-4)
    keep = text.attention_mask.bool()
    torch.testing.assert_close(packed_text[0], padded_text[keep], atol=1e-5, rtol=1e-4)   # every token, not only [CLS]


def test_cross_attention_projects_each_image_once_per_layer(g, png):
    """The first query on an image projects its tokens ([CLS] + patches) to keys/values once per fusion layer (batch
    1) for all N phrases; the cached encoding keeps them, so later queries on that image project nothing and give
    the same numbers."""
    n_patches = g.grid_size ** 2
    attention = [layer.crossattention.self for layer in g.model.text_encoder.fusion_layers]
    calls = [Calls(proj) for a in attention for proj in (a.key, a.value)]
    try:
        first = g.ground(png, PHRASES)
        after_first = [list(c.batches) for c in calls]
        again = g.ground(png, PHRASES)
        g.ground(png, PHRASES[0])
    finally:
        for c in calls:
            c.handle.remove()
    for batches in after_first:
        assert batches == [(1, 1 + n_patches, g.model.cfg.vision.width)], batches
    assert [c.batches for c in calls] == after_first, "a cached image's keys/values were projected again"
    for a, b in zip(first, again):
        assert a.box_xyxy == b.box_xyxy and a.itm == b.itm and a.itc_region == b.itc_region
    (entry,) = g.cache.snapshot().values()
    (kv,) = entry.fusion_keys_values.values()                 # the box model's: it scores ITM too
    assert len(kv) == len(attention) and all(k.shape[0] == 1 and v.shape == k.shape for k, v in kv.layers)
    assert kv is g.keys_values(entry, g.model)                # the stored value, not a recomputation


def test_cache_byte_bound_counts_the_stored_keys_values(g, png):
    """Keys/values join an entry after it was cached; the byte bound still holds once the query ends."""
    g.ground(png, PHRASES[0])
    (entry,) = g.cache.snapshot().values()
    token_bytes = entry.tokens.numel() * entry.tokens.element_size()
    assert entry.nbytes > token_bytes                         # the keys/values are counted
    g.cache.max_bytes = entry.nbytes + 1                      # room for one full entry, not two
    other = np.asarray(Image.open(png).convert("RGB")).copy()
    other[0, 0] = 255 - other[0, 0]
    g.ground(other, PHRASES[0])
    assert len(g.cache) == 1 and g.cache.nbytes <= g.cache.max_bytes


# --- the bench command ----------------------------------------------------------------------------------------------
HEADERS = ["median ms", "IQR ms", "min ms", "max ms", "first query (uncached", "follow-up query (cached",
           "8 phrases batched", "cache-hit lookup", "end-to-end, new image", "end-to-end, cached image",
           "memory: model loaded", "memory: peak", "cached speedup", "8 phrases batched / 1 phrase cached",
           "torch threads 1", "device cpu"]


def test_bench_command_runs_end_to_end():
    argv = [sys.executable, "-m", "xvlm", "bench", "--models", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)   # a hang guard, not a timing
    assert proc.returncode == 0, proc.stderr[-2000:]
    for h in HEADERS:
        assert h in proc.stdout, f"{h!r} missing from:\n{proc.stdout}"
    assert "WARNING" not in proc.stdout
    assert "vision encoder passes while timing: 2 for 2 uncached" in proc.stdout


def test_bench_markdown_appends_and_skips_missing_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "DEFAULT_MODEL_DIR", tmp_path / "no-model-here")
    md = tmp_path / "RESULTS.md"
    md.write_text("# existing\n")
    assert bench.main(["--models", "default,tiny", "--repeats", "2", "--warmup", "0", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "skipped default" in out and "no-model-here" in out
    text = md.read_text()
    assert text.startswith("# existing\n")
    assert "| query | median ms | IQR ms (q1-q3) | min ms | max ms | n |" in text
    assert "python -m xvlm bench --models default,tiny" in text and "skipped default" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith(" 2 |")]
    assert len(rows) == 6


def test_bench_with_only_a_missing_model_fails_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    assert bench.main(["--models", "default", "--repeats", "1"]) == 1
    captured = capsys.readouterr()
    assert "skipped default" in captured.out and "no model was benchmarked" in captured.err


def test_bench_rejects_bad_arguments(capsys):
    assert bench.main(["--repeats", "0"]) == 2
    assert bench.main(["--models", " "]) == 2


def test_synthetic_vocab_is_bert_base_sized(tmp_path):
    path = bench.write_synthetic_vocab(tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 30522
    tok = Tokenizer(path)
    assert tok.vocab_size == 30522
    batch = tok(bench.PHRASES)
    assert "[UNK]" not in {t for p in bench.PHRASES for t in tok.tokens(p)}
    assert batch.input_ids.shape[0] == len(bench.PHRASES)


def test_timing_statistics():
    t = bench.Timing("x", [0.004, 0.001, 0.003, 0.002])
    assert t.median == pytest.approx(2.5) and t.min == pytest.approx(1) and t.max == pytest.approx(4)
    assert t.q1 == pytest.approx(1.75) and t.q3 == pytest.approx(3.25)
    cells = bench.timing_cells(t)
    assert cells[0] == "x" and cells[-1] == "4"


def test_x2base_bench_model_is_x2vlm_base_at_384(tmp_path):
    g = bench.build_grounder("x2base", "cpu", tmp_path)
    v = g.model.cfg.vision
    assert (v.kind, v.image_res, v.grid_size, v.width, v.depth) == ("beit2", 384, 24, 768, 12)
    assert g.model.cfg.append_sep and g.tokenizer.append_sep and g.tokenizer.vocab_size == bench.BERT_BASE_VOCAB
    assert "BEiT-2 width 768 depth 12 @ 384px (24x24 patches)" in bench.describe(g)
