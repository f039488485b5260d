"""The demo served on a loopback port with the fixture model, called through gradio_client."""
from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app import callbacks as cb  # noqa: E402
from app.models import ModelRegistry  # noqa: E402
from app.ui import build_demo, launch_kwargs  # noqa: E402
from xvlm import Grounder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
F = ROOT / "tests" / "fixtures" / "official-xvlm-small"
IMG = F / "img_a.png"   # 640 x 480


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, load_official):
    g = load_official(name="fixture")
    registry = ModelRegistry(grounders={"fixture": g})
    demo = build_demo(registry, assets_dir=tmp_path_factory.mktemp("no-assets"),
                      out_dir=tmp_path_factory.mktemp("json"))
    demo.queue(default_concurrency_limit=cb.QUEUE_CONCURRENCY, max_size=cb.QUEUE_MAX_SIZE)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    try:
        yield demo, f"http://127.0.0.1:{port}/", g
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False, analytics_enabled=False)


def test_ground_endpoint_returns_boxes_inside_the_image(server, client):
    phrases = ["The RED circle on the left.", "blue-ish rectangles, top/right"]
    out = client.predict(handle_file(str(IMG)), "\n".join(phrases), api_name="/ground")
    assert out["model"] == "fixture" and out["image"] == {"width": 640, "height": 480}
    assert out["phrases"] == phrases and len(out["results"]) == 2
    direct = server[2].ground(str(IMG), phrases)
    for row, r in zip(out["results"], direct):
        assert len(row["box_xyxy"]) == 4 and all(math.isfinite(v) for v in row["box_xyxy"])
        assert row["box_xyxy"] == pytest.approx(r.box_xyxy, abs=1e-4)
        assert row["box_xyxy_unclipped"] == pytest.approx(r.box_xyxy_unclipped, abs=1e-4)
        x0, y0, x1, y1 = row["box_xyxy"]
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480      # a box with area, inside the image
        assert -1 <= row["itc_image"] <= 1 and 0 <= row["itm"] <= 1
        assert len(row["patch_heatmap"]) == 12
    assert len(out["objects"]["itc"]) == 2


def test_bad_requests_get_readable_errors_and_the_server_stays_up(client, tmp_path):
    with pytest.raises(AppError, match="No phrase"):
        client.predict(handle_file(str(IMG)), "   ", api_name="/ground")
    with pytest.raises(AppError, match=f"at most {cb.MAX_PHRASES}"):
        client.predict(handle_file(str(IMG)), "\n".join(["a square"] * 200), api_name="/ground")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(AppError, match="cannot read"):
        client.predict(handle_file(str(broken)), "a square", api_name="/ground")
    ok = client.predict(handle_file(str(IMG)), "красный круг 😀", api_name="/ground")
    assert ok["phrases"] == ["красный круг 😀"]


def test_only_the_named_endpoints_are_public_and_limits_are_set(server, client):
    demo = server[0]
    assert sorted(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == [
        "/counterfactuals", "/describe_region", "/ground", "/search", "/word_maps"]
    assert demo.max_file_size == 25 * 1024 * 1024
    assert demo._queue.max_size == cb.QUEUE_MAX_SIZE
    assert demo._queue.default_concurrency_limit == cb.QUEUE_CONCURRENCY


def test_the_app_serves_the_shipped_model(tmp_path):
    """The default model (weights/xvlm-shapes) behind the real server once: the demo most people start."""
    from app.models import DEFAULT_NAME

    g = Grounder.from_pretrained(device="cpu")
    demo = build_demo(ModelRegistry(grounders={DEFAULT_NAME: g}), assets_dir=tmp_path / "no-assets", out_dir=tmp_path)
    demo.queue(default_concurrency_limit=cb.QUEUE_CONCURRENCY, max_size=cb.QUEUE_MAX_SIZE)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        image = ROOT / "assets" / "shapes_01.png"
        out = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False).predict(
            handle_file(str(image)), "the red circle\na blue square", api_name="/ground")
    finally:
        demo.close()
    assert out["model"] == g.name and out["capabilities"] == {"box": True, "itc": True, "itm": True,
                                                                    "gradcam": True}
    direct = g.ground(image, ["the red circle", "a blue square"])
    for row, r in zip(out["results"], direct):
        assert row["box_cxcywh"] == pytest.approx(r.box_cxcywh, abs=1e-5)
        assert row["itm"] == pytest.approx(r.itm, abs=1e-5) and row["itc_image"] == pytest.approx(r.itc_image, abs=1e-5)


def test_analysis_endpoints(server, client):
    g = server[2]
    out = client.predict(handle_file(str(IMG)), "the small red circle left of the square", api_name="/counterfactuals")
    direct = g.counterfactuals(str(IMG), "the small red circle left of the square")
    assert [r["phrase"] for r in out["rows"]] == [r.edit.phrase for r in direct.rows]
    assert out["rows"][0]["iou"] == pytest.approx(1.0) and out["rows"][0]["result"]["found"] in (True, False)
    ranked = client.predict(handle_file(str(IMG)), "40, 60, 200, 220", "the red circle\nsky", api_name="/describe_region")
    assert [r["phrase"] for r in ranked["ranking"]] == [c.phrase for c in g.describe_region(
        str(IMG), [40, 60, 200, 220], ["the red circle", "sky"])]
    words = client.predict(handle_file(str(IMG)), "the red circle", None, api_name="/word_maps")
    assert words["words"] == ["the", "red", "circle"] and len(words["maps"]) == 3
    with pytest.raises(AppError, match="four numbers"):
        client.predict(handle_file(str(IMG)), "1, 2", "", api_name="/describe_region")
