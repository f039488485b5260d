"""The demo's callbacks without a server: outputs, JSON, every bad input, missing heads, encoding re-use, models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import callbacks as cb
from app.models import DEFAULT_NAME, ModelRegistry, ModelSpec, ModelUnavailable, specs_from_options
from xvlm import Grounder, InputError

ROOT = Path(__file__).resolve().parent.parent
F = ROOT / "tests" / "fixtures" / "official-xvlm-small"
IMG = F / "img_a.png"          # 640 x 480
PHRASES = "The RED circle on the left.\nblue-ish rectangles, top/right\na zebra next to the smallest green triangle"


def _official(checkpoint) -> Grounder:
    return Grounder.from_official(checkpoint, config=F / "Grounding_bbox.yaml", tokenizer=F / "vocab.txt",
                                  device="cpu")


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return _official(F / "checkpoint.pth")


@pytest.fixture(scope="module")
def box_only_checkpoint(tmp_path_factory) -> Path:
    sd = torch.load(F / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    drop = ("itm_head.", "vision_proj.", "text_proj.")
    sd = {k: v for k, v in sd.items() if not k.startswith(drop) and k != "temp"}
    path = tmp_path_factory.mktemp("box-only") / "checkpoint.pth"
    torch.save({"model": sd}, path)
    return path


@pytest.fixture(scope="module")
def box_only(box_only_checkpoint) -> Grounder:
    return _official(box_only_checkpoint)


def _readable(message: str) -> None:
    assert isinstance(message, str) and len(message) > 10
    assert "Traceback" not in message and "something went wrong" not in message


# --- rendering outputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", cb.GRANULARITIES)
def test_outputs_have_the_right_shapes(grounder, granularity, tmp_path):
    with_cam = granularity == "image"       # the Grad-CAM maps do not depend on the granularity
    view = cb.ground_and_render(grounder, str(IMG), PHRASES, granularity, 0.4, None, out_dir=tmp_path,
                                gradcam=with_cam)
    assert view.ok, view.message
    n = 3
    assert view.annotated.shape == (480, 640, 3) and view.annotated.dtype == np.uint8
    assert not np.array_equal(view.annotated, np.asarray(Image.open(IMG).convert("RGB")))   # boxes drawn
    assert len(view.itc_gallery) == n
    for img, caption in view.itc_gallery:
        assert img.shape == (480, 640, 3) and img.dtype == np.uint8 and caption
    key = {"image": "ITC(image)", "region": "ITC(region)", "objects": "ITC with boxes"}[granularity]
    assert all(key in caption for _, caption in view.itc_gallery)
    if with_cam:
        assert len(view.gradcam_gallery) == n, view.gradcam_note
        assert all(img.shape == (480, 640, 3) for img, _ in view.gradcam_gallery)
        assert all("ITM" in caption for _, caption in view.gradcam_gallery)
    assert len(view.scores["data"]) == n and len(view.scores["data"][0]) == len(cb.SCORE_HEADERS)
    assert len(view.objects_table["data"]) == n and len(view.objects_table["data"][0]) == n + 1
    if granularity == "objects":
        assert cb.figure_to_array(view.objects_figure).ndim == 3
    else:
        assert view.objects_figure is None       # only drawn where it is shown
    assert "re-used" in view.message or "encoded once" in view.message


def test_region_view_greys_out_patches_outside_the_box(grounder, tmp_path):
    image = cb.ground_and_render(grounder, str(IMG), "red circle", "image", 1.0, out_dir=tmp_path, gradcam=False)
    region = cb.ground_and_render(grounder, str(IMG), "red circle", "region", 1.0, out_dir=tmp_path, gradcam=False)
    r = grounder.ground(str(IMG), "red circle")
    if r.region_mask.all():
        pytest.skip("the predicted box covers every patch")
    differs = np.any(image.itc_gallery[0][0] != region.itc_gallery[0][0], axis=2)
    assert differs.mean() > 0.05


def test_json_file_holds_everything_shown(grounder, tmp_path):
    view = cb.ground_and_render(grounder, str(IMG), PHRASES, "objects", 0.5, 3, out_dir=tmp_path)
    assert view.ok, view.message
    data = json.loads(Path(view.json_path).read_text())
    assert Path(view.json_path).parent == tmp_path
    assert data == view.payload
    assert data["model"] == grounder.name and data["capabilities"] == grounder.capabilities
    assert data["image"] == {"width": 640, "height": 480}
    assert data["view"] == {"granularity": "objects", "heatmap_opacity": 0.5, "gradcam_layer": 3}
    assert data["limits"]["max_phrases"] == cb.MAX_PHRASES
    direct = grounder.ground(str(IMG), PHRASES.splitlines())
    assert data["phrases"] == [r.phrase for r in direct]
    for row, r in zip(data["results"], direct):
        assert row["box_xyxy"] == pytest.approx(r.box_xyxy)
        assert row["itc_image"] == pytest.approx(r.itc_image) and row["itm"] == pytest.approx(r.itm)
        assert np.asarray(row["patch_heatmap"]).shape == (12, 12)
        assert np.asarray(row["region_mask"]).dtype == bool
        assert np.asarray(row["gradcam"]).shape == (12, 12)
        x0, y0, x1, y1 = row["box_xyxy"]
        assert 0 <= x0 <= x1 <= 640 and 0 <= y0 <= y1 <= 480
        assert row["color"].startswith("#")
    assert np.asarray(data["objects"]["itc"]).shape == (3, 3)
    assert data["objects"]["itc"][1] == pytest.approx(direct[1].itc_objects)


def test_api_json_matches_the_page(grounder, tmp_path):
    api = cb.ground_json(grounder, str(IMG), PHRASES)
    page = cb.ground_and_render(grounder, str(IMG), PHRASES, out_dir=tmp_path, gradcam=False).payload
    assert [r["box_xyxy"] for r in api["results"]] == [r["box_xyxy"] for r in page["results"]]
    json.dumps(api, allow_nan=False)
    with pytest.raises(InputError, match="No phrase"):
        cb.ground_json(grounder, str(IMG), " \n ")


def test_gradio_file_payloads_are_read(grounder, tmp_path):
    import base64

    view = cb.ground_and_render(grounder, {"path": str(IMG), "orig_name": "a.png"}, "red circle", out_dir=tmp_path,
                                gradcam=False)
    assert view.ok, view.message
    url = "data:image/png;base64," + base64.b64encode(IMG.read_bytes()).decode()
    assert cb.read_image({"path": None, "url": url}).size == (640, 480)


# --- bad input: a readable message, never an exception ------------------------------------------------------------
def _image_file(tmp_path, name, im: Image.Image) -> str:
    path = tmp_path / name
    im.save(path)
    return str(path)


BAD = {
    "no image": (lambda t: None, "red circle", "No image"),
    "empty path": (lambda t: "", "red circle", "No image"),
    "empty phrases": (lambda t: str(IMG), "", "No phrase"),
    "whitespace phrases": (lambda t: str(IMG), "   \n\t \n", "No phrase"),
    "None phrases": (lambda t: str(IMG), None, "No phrase"),
    "200 phrases": (lambda t: str(IMG), "\n".join(f"thing {i}" for i in range(200)), "too many phrases"),
    "10,000-char phrase": (lambda t: str(IMG), "a" * 10_000, "too long"),
    "punctuation only": (lambda t: str(IMG), "?!.,", "no words"),
    "huge paste": (lambda t: str(IMG), "x" * (cb.MAX_TEXT_CHARS + 1), "too much text"),
    "corrupt file": (lambda t: _write(t / "broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50), "red circle",
                     "cannot read"),
    "text file": (lambda t: _write(t / "notes.jpg", b"hello, I am not an image"), "red circle", "cannot read"),
    "missing file": (lambda t: str(t / "nope.png"), "red circle", "not found"),
    "over the pixel limit": (lambda t: Image.new("L", (8000, 6000)), "red circle", "too large"),
    "zero-size array": (lambda t: np.zeros((0, 5, 3), np.uint8), "red circle", "no pixels"),
    "bad array shape": (lambda t: np.zeros((4, 4, 7), np.uint8), "red circle", "HxW"),
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_a_readable_message(grounder, case, tmp_path):
    make_image, phrases, expected = BAD[case]
    image = make_image(tmp_path)
    view = cb.ground_and_render(grounder, image, phrases, out_dir=tmp_path)
    assert not view.ok
    _readable(view.message)
    assert expected.lower() in view.message.lower(), view.message
    assert view.annotated is None and view.json_path is None
    with pytest.raises(InputError):
        cb.ground_json(grounder, image, phrases)


def _rgba(t):
    a = np.zeros((60, 80, 4), np.uint8)
    a[..., 0], a[10:40, 20:50, 3] = 255, 255
    return _image_file(t, "rgba.png", Image.fromarray(a, "RGBA"))


def _gray16(t):
    a = (np.linspace(0, 65535, 70 * 90).reshape(70, 90)).astype(np.uint16)
    return _image_file(t, "gray16.png", Image.fromarray(a, "I;16"))


ODD_BUT_FINE = {
    "1x1 image": (lambda t: Image.new("RGB", (1, 1), (255, 0, 0)), "a red circle"),
    "grayscale": (lambda t: _image_file(t, "gray.png", Image.new("L", (50, 40), 128)), "a grey square"),
    "RGBA": (_rgba, "the red square"),
    "16-bit grayscale": (_gray16, "a gradient"),
    "palette": (lambda t: _image_file(t, "p.png", Image.new("P", (30, 30), 3)), "a square"),
    "float array": (lambda t: np.random.default_rng(0).random((32, 48, 3)), "noise"),
    "non-Latin and emoji": (lambda t: str(IMG),
                            "красный круг\n赤い円\nالدائرة الحمراء\n😀🔴 circle\n🐍"),
    "control characters": (lambda t: str(IMG), "red\x00 circle\x07\r\nblue\u200b square"),
    "blank lines between phrases": (lambda t: str(IMG), "\n\nred circle\n\n\nblue square\n"),
    "exactly the phrase limit": (lambda t: str(IMG), "\n".join(f"shape {i}" for i in range(cb.MAX_PHRASES))),
    "long phrase under the limit": (lambda t: str(IMG), " ".join(["red circle"] * 90)),
}


@pytest.mark.parametrize("case", list(ODD_BUT_FINE))
def test_odd_but_valid_inputs_work(grounder, case, tmp_path):
    make_image, phrases = ODD_BUT_FINE[case]
    view = cb.ground_and_render(grounder, make_image(tmp_path), phrases, "region", out_dir=tmp_path,
                                gradcam=case == "non-Latin and emoji")
    assert view.ok, view.message
    assert view.annotated.ndim == 3 and view.annotated.shape[2] == 3
    assert max(view.annotated.shape[:2]) >= cb.DISPLAY_MIN_SIDE
    n = len([line for line in phrases.splitlines() if line.strip()])
    assert len(view.scores["data"]) == len(view.itc_gallery) == n
    json.loads(Path(view.json_path).read_text())
    if case == "long phrase under the limit":
        assert "first 30 words" in view.message


def test_30_megapixel_image_is_grounded_and_shown_small(grounder, tmp_path):
    big = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (5000, 24, 3))[:, :6000])
    assert big.width * big.height == 30_000_000
    view = cb.ground_and_render(grounder, big, "a gradient", out_dir=tmp_path, gradcam=False)
    assert view.ok, view.message
    assert max(view.annotated.shape[:2]) == cb.DISPLAY_MAX_SIDE
    assert view.payload["image"] == {"width": 6000, "height": 5000}


def test_odd_controls_fall_back_to_defaults(grounder, tmp_path):
    view = cb.ground_and_render(grounder, str(IMG), "red circle", "nonsense", float("nan"), None, out_dir=tmp_path,
                                gradcam=False)
    assert view.ok and view.payload["view"]["granularity"] == "image"
    assert "switched off" in view.gradcam_note and view.gradcam_gallery == []
    assert "gradcam" not in view.payload["results"][0]
    assert view.payload["view"]["heatmap_opacity"] == cb.DEFAULT_ALPHA
    bad_layer = cb.ground_and_render(grounder, str(IMG), "red circle", "image", 0.5, 0, out_dir=tmp_path)
    assert not bad_layer.ok and "fusion layers" in bad_layer.message


def test_internal_failure_is_reported_not_raised(grounder, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("CUDA out of something")

    monkeypatch.setattr(grounder, "ground", boom)
    view = cb.ground_and_render(grounder, str(IMG), "red circle", out_dir=tmp_path)
    assert not view.ok and "CUDA out of something" in view.message


# --- models without some heads ----------------------------------------------------------------------------------
def test_box_only_model_says_which_heads_are_missing(box_only, tmp_path):
    assert box_only.capabilities == {"box": True, "itc": False, "itm": False, "gradcam": False}
    for granularity in cb.GRANULARITIES:
        view = cb.ground_and_render(box_only, str(IMG), PHRASES, granularity, 0.5, None, out_dir=tmp_path)
        assert view.ok, view.message
        assert view.annotated.shape == (480, 640, 3)
        assert view.itc_gallery == [] and "no ITC head" in view.itc_note
        assert view.gradcam_gallery == [] and "no ITM head" in view.gradcam_note
        assert view.objects_table is None and "ITC head" in view.objects_note
        assert "no ITC head" in view.message and "no ITM head" in view.message
        assert [row[3:] for row in view.scores["data"]] == [["n/a"] * 5] * 3   # scores, verdict, evidence
        assert all(row[2] != "n/a" for row in view.scores["data"])
    data = view.payload
    assert all(r["itc_image"] is None and r["itm"] is None and r["box_xyxy"] for r in data["results"])
    assert "itc" in data["results"][0]["notes"] and "gradcam" in data["results"][0]["notes"]
    assert data["objects"] is None
    assert "has: bbox head ·" in cb.describe_model(box_only)
    assert "lacks: ITC head, ITM head, Grad-CAM" in cb.describe_model(box_only)


# --- the image encoding is re-used when only the phrases change ----------------------------------------------------
def test_changing_only_the_phrases_reuses_the_image_encoding(grounder, tmp_path):
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))   # pixels no other test used
    before = grounder.stats["vision_passes"]
    first = cb.ground_and_render(grounder, image, "red circle", out_dir=tmp_path, gradcam=False)
    assert first.ok and grounder.stats["vision_passes"] == before + 1
    hits = grounder.stats["cache_hits"]
    for phrases in ("blue square\ngreen triangle", "a zebra", "red circle"):
        again = cb.ground_and_render(grounder, image.copy(), phrases, "region", out_dir=tmp_path,
                                     gradcam=phrases == "a zebra")
        assert again.ok and "re-used from the cache" in again.message
    assert grounder.stats["vision_passes"] == before + 1
    assert grounder.stats["cache_hits"] > hits
    other = cb.ground_and_render(grounder, Image.fromarray(255 - np.asarray(image)), "a zebra", out_dir=tmp_path,
                                 gradcam=False)
    assert other.ok and grounder.stats["vision_passes"] == before + 2


# --- phrases, examples, models -----------------------------------------------------------------------------------
def test_parse_phrases_bounds():
    assert cb.parse_phrases(" a \n\n b ") == ["a", "b"]
    assert len(cb.parse_phrases("\n".join("x" * 5 for _ in range(cb.MAX_PHRASES)))) == cb.MAX_PHRASES
    with pytest.raises(InputError, match=f"at most {cb.MAX_PHRASES}"):
        cb.parse_phrases("\n".join("x" for _ in range(cb.MAX_PHRASES + 1)))
    with pytest.raises(InputError, match="line 2"):
        cb.parse_phrases("fine\n" + "y" * 2000)
    assert cb.LIMITS["max_phrases"] == cb.MAX_PHRASES


def test_load_examples(tmp_path):
    assert cb.load_examples(tmp_path / "missing") == []
    assert cb.load_examples(tmp_path) == []
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    assert cb.load_examples(tmp_path) == [[str(tmp_path / "a.jpg"), cb.GENERIC_PHRASE],
                                          [str(tmp_path / "b.png"), cb.GENERIC_PHRASE]]
    (tmp_path / "examples.json").write_text(json.dumps([
        {"image": "b.png", "phrases": ["the red circle", "a blue square"]},
        {"image": "gone.png", "phrases": ["x"]}, "junk", {"phrases": ["no image"]}]))
    assert cb.load_examples(tmp_path) == [[str(tmp_path / "b.png"), "the red circle\na blue square"]]
    (tmp_path / "examples.json").write_text("{not json")
    assert len(cb.load_examples(tmp_path)) == 2


def test_model_registry_is_lazy_and_explains_problems(tmp_path, box_only_checkpoint):
    specs = specs_from_options(checkpoint=str(box_only_checkpoint), config=str(F / "Grounding_bbox.yaml"),
                               tokenizer=str(F / "vocab.txt"), default_weights=tmp_path / "no-default")
    assert len(specs) == 1 and specs[0].kind == "official"
    reg = ModelRegistry(specs)
    name = reg.default
    assert not reg.is_loaded(name)
    g = reg.get(name)
    assert reg.is_loaded(name) and reg.get(name) is g and g.capabilities["box"] and not g.capabilities["itc"]
    assert g.stats["vision_passes"] == 0 and len(g.cache) == 0      # warmed up on load, counters untouched
    with pytest.raises(ModelUnavailable, match="unknown model"):
        reg.get("nope")
    bad = ModelRegistry([ModelSpec("broken", "official", str(tmp_path / "x.pth"), preset="xvlm-base-4m")])
    with pytest.raises(ModelUnavailable, match="checkpoint not found.*tokenizer"):
        bad.get("broken")
    with pytest.raises(ModelUnavailable, match="--checkpoint"):
        specs_from_options(config="c.yaml")
    assert specs_from_options(default_weights=tmp_path) == []
    (tmp_path / "config.json").write_text("{}")
    assert [s.name for s in specs_from_options(default_weights=tmp_path)] == [DEFAULT_NAME]


def test_a_box_only_checkpoint_served_with_a_scorer_gets_itc_and_itm(tmp_path, box_only_checkpoint, load_script):
    """--scorer-checkpoint (XVLM_SCORER_CHECKPOINT) pairs the official box-only checkpoint with one that has the
    ITC/ITM heads, as `Grounder.from_official(..., scorer_checkpoint=...)` does; a scorer without its model, or a
    missing scorer file, is a clear message."""
    main = load_script("app.py")
    env = {"XVLM_CHECKPOINT": str(box_only_checkpoint), "XVLM_CONFIG": str(F / "Grounding_bbox.yaml"),
           "XVLM_TOKENIZER": str(F / "vocab.txt"), "XVLM_SCORER_CHECKPOINT": str(F / "checkpoint.pth")}
    reg = main.build_registry(main.parse_args([], env=env))
    name = reg.default
    assert name.endswith("+ scorer checkpoint.pth")
    g = reg.get(name)
    assert g.capabilities == {"box": True, "itc": True, "itm": True, "gradcam": True}
    direct = Grounder.from_official(box_only_checkpoint, config=F / "Grounding_bbox.yaml", tokenizer=F / "vocab.txt",
                                    scorer_checkpoint=F / "checkpoint.pth", device="cpu")
    a, b = g.ground(IMG, "the red circle"), direct.ground(IMG, "the red circle")
    assert (a.box_cxcywh, a.itm, a.itc_region) == (b.box_cxcywh, b.itm, b.itc_region) and a.itm is not None
    with pytest.raises(ModelUnavailable, match="scorer checkpoint not found"):
        main.build_registry(main.parse_args(["--scorer-checkpoint", str(tmp_path / "gone.pth")], env=env))
    with pytest.raises(ModelUnavailable, match="--scorer-checkpoint"):
        specs_from_options(scorer_checkpoint=str(F / "checkpoint.pth"), default_weights=None)
    with pytest.raises(ModelUnavailable, match="--scorer"):
        specs_from_options(scorer=str(tmp_path), default_weights=None)
    spec = specs_from_options(model=str(tmp_path), scorer=str(tmp_path / "none"), default_weights=None)[0]
    assert any("no scorer model in" in p for p in spec.problems())


def test_app_flags_and_env_vars(tmp_path, capsys, load_script):
    main = load_script("app.py")
    env = {"XVLM_CHECKPOINT": "env.pth", "XVLM_PRESET": "xvlm-base-4m", "XVLM_TOKENIZER": "vocab.txt",
           "XVLM_MODEL": "some/dir", "XVLM_CONFIG": ""}
    args = main.parse_args(["--checkpoint", "flag.pth", "--port", "7999"], env=env)
    assert (args.checkpoint, args.preset, args.tokenizer, args.model, args.config) == \
        ("flag.pth", "xvlm-base-4m", "vocab.txt", "some/dir", None)
    assert args.port == 7999 and args.host == "127.0.0.1" and not args.share
    assert main.parse_args([], env={"SPACE_ID": "me/demo"}).host == "0.0.0.0"
    assert not args.compile and main.parse_args([], env={"XVLM_COMPILE": "1"}).compile
    assert main.build_registry(main.parse_args(["--compile"], env={})).compile
    # a missing model is a clear message and exit code 2, not a traceback
    rc = main.main(["--checkpoint", str(tmp_path / "missing.pth"), "--preset", "xvlm-base-4m",
                    "--tokenizer", str(F / "vocab.txt")])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err


def test_the_page_shows_the_image_as_the_model_saw_it_and_says_when_it_differs(grounder, tmp_path):
    """An official checkpoint reads a transparent PNG as `convert('RGB')`: the page draws that image (the stored
    colours under the transparency, not white) and says that a viewer shows the upload differently."""
    rgba = np.zeros((200, 300, 4), np.uint8)
    rgba[..., 0] = 200                                   # red everywhere, transparent on the left half
    rgba[:, 150:, 3] = 255
    path = tmp_path / "clear.png"
    Image.fromarray(rgba).save(path)
    view = cb.ground_and_render(grounder, str(path), "the red circle", out_dir=tmp_path, gradcam=False)
    assert view.ok and "differently from how an image viewer shows the upload" in view.message
    assert "transparency was dropped" in view.message
    shown = view.annotated
    assert tuple(shown[shown.shape[0] // 2, 5]) == (200, 0, 0)          # the stored red, where a viewer shows none
    assert view.payload["input_conversion"] and "transparency" in view.payload["input_conversion"][0]
    api = cb.ground_json(grounder, str(path), "the red circle")
    assert api["input_conversion"] == view.payload["input_conversion"]
    assert api["results"][0]["box_cxcywh"] == grounder.ground(Image.open(path).convert("RGB"),
                                                              "the red circle").box_cxcywh
    plain = cb.ground_and_render(grounder, str(IMG), "the red circle", out_dir=tmp_path, gradcam=False)
    assert "differently" not in plain.message and plain.payload["input_conversion"] == []
