"""Retrieval the X-VLM way: the official `Retrieval.py` evaluation reproduced on the fixture gallery (ITC matrix, the
ITM-logit re-ranked score matrices, recall), and search over a persisted gallery index with a grounded box per hit."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder, InputError, retrieval_metrics
from xvlm import index as gindex
from xvlm.retrieval import NOT_RERANKED, pad_max_length

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
R = json.loads((F / "retrieval.json").read_text())
IMAGES = [F / im["file"] for im in R["images"]]
TEXTS = [t["raw"] for t in R["texts"]]
TOL = 1e-5


@pytest.fixture(scope="module")
def g(load_official) -> Grounder:
    return load_official(cache_entries=32, name="official-small")


@pytest.fixture(scope="module")
def scores(g):
    return g.retrieval_scores(IMAGES, TEXTS, k_test=R["k_test"])


@pytest.fixture(scope="module")
def built(g, tmp_path_factory):
    """A saved index of the whole fixture gallery (read-only for the tests that use it)."""
    root = tmp_path_factory.mktemp("idx") / "gallery.idx"
    g.index_images(IMAGES, root)
    return root


def test_texts_are_tokenized_as_the_official_evaluation(g):
    assert [c for c in (g.tokenizer(TEXTS).captions)] == [t["caption_after_pre_caption"] for t in R["texts"]]
    b = pad_max_length(g.tokenizer(TEXTS, max_tokens=R["max_tokens"]), R["max_tokens"], R["pad_token_id"])
    assert b.input_ids.tolist() == R["input_ids"]
    assert b.attention_mask.tolist() == R["attention_mask"]


def test_score_matrices_match_the_official_evaluation(scores):
    np.testing.assert_allclose(scores.itc, R["itc_sims_image_x_text"], atol=TOL, rtol=0)
    np.testing.assert_allclose(scores.i2t, R["score_matrix_i2t"], atol=TOL, rtol=0)
    np.testing.assert_allclose(scores.t2i, R["score_matrix_t2i"], atol=TOL, rtol=0)
    # -100 exactly where the official code did not re-rank; the top-k sets are the official ones
    assert ((scores.i2t == NOT_RERANKED) == (np.asarray(R["score_matrix_i2t"]) == NOT_RERANKED)).all()
    assert ((scores.t2i == NOT_RERANKED) == (np.asarray(R["score_matrix_t2i"]) == NOT_RERANKED)).all()
    assert [sorted(r) for r in scores.i2t_topk.tolist()] == [sorted(r["text_idx"]) for r in R["i2t_topk"]]
    assert [sorted(r) for r in scores.t2i_topk.tolist()] == [sorted(r["image_idx"]) for r in R["t2i_topk"]]


def test_recall_matches_the_official_itm_eval(scores):
    got = retrieval_metrics(scores.i2t, scores.t2i, R["txt2img"], R["img2txt"])
    for key, value in R["ranks"]["recall_stable_argsort"].items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["r_mean"] == pytest.approx(np.mean([got["txt_r_mean"], got["img_r_mean"]]))
    # tie-free matrices: the official np.argsort order and the stable one agree with the official dict everywhere
    itc = np.asarray(R["itc_sims_image_x_text"])
    for stable in (True, False):
        tie_free = retrieval_metrics(itc, itc.T, R["txt2img"], R["img2txt"], stable=stable)
        assert tie_free == pytest.approx(R["itm_eval_on_itc_sims"], abs=1e-9)


def test_metrics_count_the_best_ground_truth_text():
    # image 0 has texts {0, 1}; text 1 ranks first -> TR@1 hit even though text 0 ranks last
    i2t = np.array([[0.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    t2i = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    m = retrieval_metrics(i2t, t2i, txt2img=[0, 0, 1], img2txt=[[0, 1], [2]])
    assert m["txt_r1"] == 100.0
    assert m["img_r1"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="do not match"):
        retrieval_metrics(i2t, t2i, txt2img=[0, 0], img2txt=[[0, 1], [2]])


def test_k_test_larger_than_the_gallery_is_refused(g):
    with pytest.raises(InputError, match="k_test=8 is larger than the gallery"):
        g.retrieval_scores(IMAGES, TEXTS, k_test=8)
    with pytest.raises(InputError, match="empty gallery"):
        g.retrieval_scores([], TEXTS, k_test=1)


def test_index_holds_the_official_image_features(built):
    idx = gindex.GalleryIndex.load(built)
    assert idx.ids == [p.name for p in IMAGES]
    np.testing.assert_allclose(idx.vectors, R["image_embeds"], atol=TOL, rtol=0)
    assert [it["size"] for it in idx.items] == [im["size_wh"] for im in R["images"]]
    man = json.loads((built / "manifest.json").read_text())
    assert man["model"]["name"] == "official-small" and len(man["model"]["fingerprint"]) == 16


@pytest.mark.parametrize("text_id", [1, 5, 9])
def test_search_ranks_like_the_official_t2i_row(g, built, text_id):
    """The re-ranked hits come in the order of the official t2i score row, with its ITM logits."""
    hits = g.search(built, TEXTS[text_id], k=3, rerank=R["k_test"])
    row = np.asarray(R["score_matrix_t2i"][text_id])
    expected = np.argsort(-row, kind="stable")[:3]
    assert [h.id for h in hits] == [IMAGES[i].name for i in expected]
    np.testing.assert_allclose([h.itm_logit for h in hits], row[expected], atol=TOL, rtol=0)
    np.testing.assert_allclose([h.itc for h in hits], np.asarray(R["itc_sims_image_x_text"])[expected, text_id],
                               atol=TOL, rtol=0)
    assert [h.rank for h in hits] == [1, 2, 3]


def test_search_hits_carry_the_grounding_of_their_image(g, built):
    hits = g.search(built, TEXTS[0], k=4, rerank=2)
    assert [h.itm_logit is not None for h in hits] == [True, True, False, False]   # past rerank: ITC order
    assert hits[2].itc >= hits[3].itc
    for h in hits:
        ref = g.ground(h.path, TEXTS[0])
        assert h.box_xyxy == pytest.approx(ref.box_xyxy, abs=1e-4)
        assert h.itm == pytest.approx(ref.itm, abs=1e-5)
        assert h.grounding.patch_heatmap.shape == (12, 12)
    for h in hits[:2]:       # the ranking logit and the shown probability are the same ITM head's
        assert h.itm == pytest.approx(1 / (1 + np.exp(-(h.itm_logit - _other_logit(g, h.path, TEXTS[0])))), abs=1e-4)


def _other_logit(g, path, text):
    from xvlm.retrieval import encode_texts, itm_logits
    m = g.itm_model
    t = encode_texts(g, [text], m)
    return float(itm_logits(g, m, t, [0], [g.encode_image(path, m).tokens])[0, 0])


def test_search_clamps_rerank_and_k_to_the_gallery(g, built):
    hits = g.search(built, TEXTS[3], k=50, rerank=100, ground=False)
    assert len(hits) == len(IMAGES) and all(h.itm_logit is not None for h in hits)
    assert hits[0].grounding is None


def test_search_re_ranks_as_many_as_the_model_config_says_when_not_told(g, built, monkeypatch):
    """No `rerank`: the model's search_rerank (16, the protocol's k_test, clamped; a model whose card shows its ITM
    ranks worse than ITC, as the shipped one, sets 0: ITC order, no ITM logit)."""
    hits = g.search(built, TEXTS[5], k=7, ground=False)
    assert g.model.cfg.search_rerank == 16 and all(h.itm_logit is not None for h in hits)
    monkeypatch.setattr(g.model, "cfg", dataclasses.replace(g.model.cfg, search_rerank=0))
    hits = g.search(built, TEXTS[5], k=7, ground=False)
    assert all(h.itm_logit is None for h in hits)
    itc = np.asarray(R["itc_sims_image_x_text"])[:, 5]
    assert [h.id for h in hits] == [IMAGES[i].name for i in np.argsort(-itc, kind="stable")]
    assert [h.itm_logit for h in g.search_texts(IMAGES[0], TEXTS[:4])] == [None] * 4


def test_the_shipped_model_searches_by_itc_unless_told():
    from xvlm.config import XVLMConfig
    cfg = XVLMConfig.from_dict(json.loads((ROOT / "weights" / "xvlm-shapes" / "config.json").read_text()))
    assert cfg.search_rerank == 0


def test_search_texts_ranks_like_the_official_i2t_row(g):
    image_id = 2
    hits = g.search_texts(IMAGES[image_id], TEXTS, k=4, rerank=R["k_test"])
    row = np.asarray(R["score_matrix_i2t"][image_id])
    expected = np.argsort(-row, kind="stable")[:4]
    assert [h.index for h in hits] == expected.tolist()
    np.testing.assert_allclose([h.itm_logit for h in hits], row[expected], atol=TOL, rtol=0)
    assert all(0 < h.itm < 1 for h in hits)


# --- the index on disk: incremental, resumable, bad input ----------------------------------------------------------
def test_adding_images_encodes_only_the_new_ones(g, tmp_path, monkeypatch):
    encoded = []
    real = gindex.encode_vectors
    monkeypatch.setattr(gindex, "encode_vectors", lambda g_, ims: encoded.extend(ims) or real(g_, ims))
    root = tmp_path / "idx"
    g.index_images(IMAGES[:3], root)
    idx = g.index_images(IMAGES, root)
    assert len(encoded) == len(IMAGES)                       # 3 + 4: the first three were not re-encoded
    assert idx.report.already_indexed == 3 and len(idx.report.added) == 4
    np.testing.assert_allclose(gindex.GalleryIndex.load(root).vectors, R["image_embeds"], atol=TOL, rtol=0)
    assert len(list(root.glob("vectors-*.safetensors"))) == 1   # the superseded vectors file is gone


def test_duplicates_are_reported_once_and_unreadable_files_skipped(g, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    copy = tmp_path / "copy_of_g0.png"
    shutil.copy(IMAGES[0], copy)
    idx = g.index_images([IMAGES[0], copy, bad, IMAGES[1], copy], tmp_path / "idx")
    assert len(idx) == 2
    assert idx.report.duplicates == [(str(copy), IMAGES[0].name)]   # the second mention of copy is 'already seen'
    assert [a for a, _ in idx.report.skipped] == [str(bad)]
    assert "cannot read image broken.png" in idx.report.skipped[0][1]
    # an in-memory image with the same pixels as an indexed file is a duplicate too
    from PIL import Image
    idx = g.index_images([Image.open(IMAGES[1])], tmp_path / "idx")
    assert idx.report.duplicates == [("image 0", IMAGES[1].name)] and len(idx) == 2


def test_in_memory_images_are_kept_as_files_for_reranking(g, tmp_path):
    from PIL import Image
    idx = g.index_images([Image.open(p) for p in IMAGES[:3]], tmp_path / "idx")
    assert len(list((tmp_path / "idx" / "images").glob("*.png"))) == 3
    hits = g.search(idx, TEXTS[2], k=2, rerank=3)
    assert all(Path(h.path).parent == tmp_path / "idx" / "images" for h in hits)


def test_empty_gallery_is_a_clear_error_and_writes_nothing(g, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(InputError, match="empty gallery: no readable images.*notes.png"):
        g.index_images([bad], tmp_path / "idx")
    assert not (tmp_path / "idx" / "manifest.json").exists()
    with pytest.raises(InputError, match="empty gallery"):
        g.index_images([], tmp_path / "idx")


def test_an_index_from_another_model_is_refused_naming_both(built, tmp_path, make_tiny_grounder):
    other = make_tiny_grounder(tmp_path)
    with pytest.raises(gindex.IndexError_, match=r"built by model 'official-small'.*not by 'tiny \(random weights\)'"):
        other.search(built, "a red circle")
    before = (built / "manifest.json").read_bytes()
    with pytest.raises(gindex.IndexError_, match="official-small"):
        other.index_images(IMAGES[:1], built)
    assert (built / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["manifest-json", "manifest-keys", "vectors-bytes", "vectors-missing"])
def test_a_corrupted_index_is_a_clear_error_and_nothing_is_overwritten(g, built, tmp_path, damage):
    root = tmp_path / "idx"
    shutil.copytree(built, root)
    man = root / "manifest.json"
    vec = next(root.glob("vectors-*.safetensors"))
    if damage == "manifest-json":
        man.write_text(man.read_text()[:200])
    elif damage == "manifest-keys":
        man.write_text(json.dumps({"format": "xvlm-gallery-index", "version": 1}))
    elif damage == "vectors-bytes":
        data = bytearray(vec.read_bytes())
        data[-5] ^= 0xFF
        vec.write_bytes(bytes(data))
    else:
        vec.unlink()
    snapshot = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(gindex.IndexError_, match="corrupted index"):
        g.search(root, "a red circle")
    with pytest.raises(gindex.IndexError_, match="corrupted index"):
        g.index_images(IMAGES[:2], root)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == snapshot


def test_a_gallery_file_changed_after_indexing_is_named(g, tmp_path):
    img = tmp_path / "a.png"
    shutil.copy(IMAGES[4], img)
    idx = g.index_images([img], tmp_path / "idx")
    shutil.copy(IMAGES[5], img)
    with pytest.raises(InputError, match="a.png changed since it was indexed"):
        g.search(idx, "a small black square", k=1, rerank=1)


def test_approximate_search_reports_recall_against_exact():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    x = centres[rng.integers(0, 50, 4000)] + 0.3 * rng.normal(size=(4000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    exact = gindex.VectorSearch(x)
    ivf = gindex.VectorSearch(x, exact_max=1000, nlist=64, nprobe=8)
    assert exact.kind == "exact" and ivf.kind == "ivf64,nprobe=8"
    q = x[:200] + 0.01 * rng.normal(size=(200, 32)).astype(np.float32)
    assert exact.recall(q, 10) == 1.0
    r = ivf.recall(q, 10)
    assert 0.8 < r <= 1.0
    rows, sims = exact.search(q[:1], 5)
    np.testing.assert_allclose(sims[0], np.sort(x @ q[0])[::-1][:5], atol=1e-5)
    np.testing.assert_allclose(x[rows[0]] @ q[0], sims[0], atol=1e-5)


def test_an_index_past_the_exact_threshold_searches_approximately_and_reports_recall(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 16)).astype(np.float32) + 4 * np.repeat(np.eye(16, dtype=np.float32)[:10], 300, 0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = gindex.GalleryIndex("unused", {"embed_dim": 16}, x, [{"id": str(i), "path": None, "pixels_sha1": str(i)}
                                                                 for i in range(3000)])
    assert idx.ann_recall() == 1.0                       # exact below the threshold
    monkeypatch.setattr(gindex, "EXACT_MAX", 1000)
    idx._search = None
    assert not idx.searcher.exact and idx.searcher.kind.startswith("ivf")
    assert 0.9 <= idx.ann_recall() <= 1.0


def test_the_approximate_index_is_saved_beside_the_vectors_and_reused(g, tmp_path, monkeypatch):
    monkeypatch.setattr(gindex, "EXACT_MAX", 3)
    root = tmp_path / "idx"
    g.index_images(IMAGES[:5], root)
    idx = gindex.GalleryIndex.load(root)
    before = idx.search(np.asarray(R["text_embeds"][:2], np.float32), 3)
    (ann,) = root.glob("ivf-*.faiss")
    assert ann.name == f"ivf-{idx.vectors_sha256[:16]}.faiss"
    built = []
    real_init = gindex.VectorSearch.__init__
    monkeypatch.setattr(gindex.VectorSearch, "__init__",
                        lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    again = gindex.GalleryIndex.load(root)
    after = again.search(np.asarray(R["text_embeds"][:2], np.float32), 3)
    assert built == [] and not again.searcher.exact                 # read from the file, not rebuilt
    np.testing.assert_array_equal(before[0], after[0])
    ann.write_bytes(b"damaged")
    assert gindex.GalleryIndex.load(root).searcher.index.ntotal == 5 and built == [1]   # a damaged cache is rebuilt
    g.index_images(IMAGES[5:], root)                                # new vectors: the stale IVF file goes
    assert not list(root.glob("ivf-*.faiss"))
