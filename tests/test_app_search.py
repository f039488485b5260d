"""The app's "Search a gallery" tab: its callbacks (ranked hits with boxes, errors as messages, a clicked hit opened
for the grounding view) and its `/search` API endpoint through gradio_client."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from app import search_tab as st
from xvlm import Grounder

F = Path(__file__).resolve().parent / "fixtures" / "official-xvlm-small"
R = json.loads((F / "retrieval.json").read_text())
GALLERY = [F / im["file"] for im in R["images"]]


@pytest.fixture(scope="module")
def g(load_official) -> Grounder:
    return load_official(name="fixture")


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    return st.GalleryIndexes(tmp_path_factory.mktemp("galleries"))


def test_hits_come_ranked_with_boxes_and_scores(g, indexes):
    phrase = R["texts"][6]["raw"]
    items, rows, status, hits = st.search_gallery(g, [str(p) for p in GALLERY], phrase, k=3, rerank=5, indexes=indexes)
    direct = g.search(indexes.get(g, GALLERY), phrase, k=3, rerank=5)
    assert [r[1] for r in rows] == [Path(h.id).name for h in direct]
    assert [float(r[2]) for r in rows] == pytest.approx([h.itm_logit for h in direct], abs=1e-3)
    assert len(items) == 3 and all(isinstance(im, np.ndarray) and im.ndim == 3 for im, _ in items)
    assert items[0][1].startswith("#1 ") and "ITM" in items[0][1] and "ITC" in items[0][1]
    assert "**3** of 7 images" in status
    # the same gallery is indexed once per model
    assert indexes.get(g, list(reversed(GALLERY))) is indexes.get(g, GALLERY)
    image, opened_phrase = st.open_hit(hits, 1)
    assert image.size == tuple(R["images"][GALLERY.index(Path(direct[1].path))]["size_wh"])
    assert opened_phrase == phrase.strip()


def test_user_errors_are_messages(g, indexes, tmp_path):
    assert "No images" in st.search_gallery(g, [], "a circle", use_examples=False, indexes=indexes)[2]
    assert "empty phrase" in st.search_gallery(g, [str(GALLERY[0])], "  ", indexes=indexes)[2]
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    assert "empty gallery" in st.search_gallery(g, [str(bad)], "a circle", indexes=indexes)[2]
    _, rows, status, _ = st.search_gallery(g, [str(GALLERY[0]), str(bad)], "a circle", indexes=indexes)
    assert len(rows) == 1 and "left out: bad.png" in status
    with pytest.raises(st.InputError):
        st.open_hit([], 0)


def test_example_gallery_is_bundled_and_searchable(g, indexes):
    files = st.example_gallery()
    assert len(files) >= 8
    captions = json.loads((st.ASSETS / "gallery" / "captions.json").read_text())
    assert sorted(c["image"] for c in captions) == [p.name for p in files]
    _, rows, _, _ = st.search_gallery(g, None, captions[0]["caption"], k=2, indexes=indexes)
    assert len(rows) == 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_endpoint_via_gradio_client(g, tmp_path):
    pytest.importorskip("gradio_client")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from app.models import ModelRegistry
    from app.ui import build_demo

    demo = build_demo(ModelRegistry(grounders={"fixture": g}), out_dir=tmp_path)
    demo.queue()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        out = client.predict([handle_file(str(p)) for p in GALLERY[:4]], "a red circle", 3, api_name="/search")
        assert out["model"] == "fixture" and out["gallery_size"] == 4 and len(out["hits"]) == 3
        assert [h["rank"] for h in out["hits"]] == [1, 2, 3]
        assert {h["image"] for h in out["hits"]} <= {p.name for p in GALLERY[:4]}
        assert all(len(h["box_xyxy"]) == 4 and h["itm_logit"] is not None for h in out["hits"])
        assert out["hits"][0]["itm_logit"] >= out["hits"][1]["itm_logit"]
        examples = client.predict([], "a small gray circle", 2, api_name="/search")   # none given: the examples
        assert examples["gallery_size"] == len(st.example_gallery())
        with pytest.raises(AppError, match="empty phrase"):
            client.predict([handle_file(str(GALLERY[0]))], "   ", 2, api_name="/search")
    finally:
        demo.close()
