"""`python -m xvlm ground` end to end: real subprocesses (started concurrently at import to keep the suite fast),
plus in-process runs of `xvlm.cli.main` for the remaining options and errors."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

torch.set_num_threads(1)   # 2 shared cores: intra-op threads only contend
ROOT = Path(__file__).resolve().parent.parent
F = ROOT / "tests" / "fixtures" / "official-xvlm-small"
IMAGE = F / "img_b.png"                                   # 300 x 500
MODEL = ["--checkpoint", str(F / "checkpoint.pth"), "--config", str(F / "Grounding_bbox.yaml"),
         "--tokenizer", str(F / "vocab.txt"), "--device", "cpu"]
PHRASES = ["The RED circle on the left.", "blue-ish rectangles, top/right", "a zebra"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "xvlm", *args], cwd=ROOT, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)


def start_all() -> tuple[Path, dict[str, subprocess.Popen]]:
    """Every subprocess of this module, started together. Each pays for a fresh interpreter importing torch/timm,
    so they are started when this module is imported (collection) and run while the other tests do; the `runs`
    fixture collects them."""
    tmp = Path(tempfile.mkdtemp(prefix="xvlm-cli-test-"))
    garbage = tmp / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(512))
    commands = {
        "json": ["ground", str(IMAGE), *PHRASES, *MODEL, "--json", "--out", str(tmp / "figure.png")],
        "missing_image": ["ground", str(tmp / "nope.png"), "a red circle", *MODEL],
        "garbage_image": ["ground", str(garbage), "a red circle", *MODEL],
        "empty_phrase": ["ground", str(IMAGE), "   ", *MODEL],
    }
    return tmp, {name: start(args, tmp / name) for name, args in commands.items()}


_STARTED = start_all()


@atexit.register
def _cleanup() -> None:  # also when the fixture never ran (e.g. --collect-only, -k deselecting these tests)
    for p in _STARTED[1].values():
        if p.poll() is None:
            p.kill()
            p.wait()
    shutil.rmtree(_STARTED[0], ignore_errors=True)


@pytest.fixture(scope="module")
def runs():
    """{name: (returncode, stdout, stderr)} of the subprocesses, plus 'tmp': their folder."""
    tmp, procs = _STARTED
    out = {}
    try:
        for name, p in procs.items():
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            out[name] = (p.returncode, (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text())
        out["tmp"] = tmp
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_json_one_object_per_phrase_with_box_inside_image(runs):
    code, stdout, stderr = runs["json"]
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == len(PHRASES)
    W, H = Image.open(IMAGE).size
    for line, phrase in zip(lines, PHRASES):
        d = json.loads(line)
        assert d["phrase"] == phrase and d["image_size"] == [W, H]
        assert "patch_heatmap" not in d and "region_mask" not in d      # only with --heatmaps
        x0, y0, x1, y1 = d["box_xyxy"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert 0 <= cx <= W and 0 <= cy <= H and x1 > x0 and y1 > y0
        assert 0 <= d["itm"] <= 1 and -1 <= d["itc_image"] <= 1 and -1 <= d["itc_region"] <= 1
    assert "Traceback" not in stderr


def test_out_writes_a_png_figure(runs):
    code, _, stderr = runs["json"]
    assert code == 0, stderr
    fig = runs["tmp"] / "figure.png"
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = Image.open(fig).size
    assert w > 1100 and h > 3 * 150             # 3 phrase rows; 4 columns: the fixture model has an ITM head (Grad-CAM)


@pytest.mark.parametrize("name, words", [("missing_image", "not found"), ("garbage_image", "cannot read"),
                                         ("empty_phrase", "empty phrase")])
def test_user_errors_are_one_line_without_traceback(runs, name, words):
    code, stdout, stderr = runs[name]
    assert code == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0].lower(), stderr
    assert stdout == ""


# --- in-process (same code path as `python -m xvlm`, without paying for another interpreter) ----------------------
def run_main(capsys, *args) -> tuple[int, str, str]:
    from xvlm.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_table_output(capsys):
    code, out, err = run_main(capsys, "ground", str(IMAGE), PHRASES[0], "a zebra", *MODEL)
    assert code == 0, err
    assert PHRASES[0] in out and "a zebra" in out and "img_b.png (300x500)" in out
    for field in ("box (px)", "ITC image", "ITC region", "ITM"):
        assert out.count(field) == 2
    assert "model text  : the red circle on the left" in out      # the caption the model saw, when it differs


def test_heatmaps_flag_adds_arrays(capsys):
    code, out, err = run_main(capsys, "ground", str(IMAGE), "circle", *MODEL, "--json", "--heatmaps")
    assert code == 0, err
    d = json.loads(out)
    assert len(d["patch_heatmap"]) == 12 and len(d["region_mask"][0]) == 12


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "/nonexistent/ckpt.pth", "--config", str(F / "Grounding_bbox.yaml"),
      "--tokenizer", str(F / "vocab.txt")], "not found"),
    (["--checkpoint", str(F / "checkpoint.pth"), "--tokenizer", str(F / "vocab.txt")], "--config"),
    (["--checkpoint", str(F / "checkpoint.pth"), "--preset", "nope", "--tokenizer", str(F / "vocab.txt")],
     "unknown preset"),
    ([*MODEL, "--out", "figure.xyz"], "unsupported figure format"),
    ([*MODEL, "--gradcam-layer", "0", "--out", "unused.png"], "fusion layer"),
    (["--model", "/nonexistent/model"], "not found"),
])
def test_more_user_errors(capsys, tmp_path, args, words):
    args = [str(tmp_path / a) if a == "unused.png" else a for a in args]
    code, out, err = run_main(capsys, "ground", str(IMAGE), "circle", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "unused.png").exists()


def test_checkpoint_that_does_not_fit_is_one_line(capsys, tmp_path):
    import torch

    state = torch.load(F / "checkpoint.pth", weights_only=True)["model"]
    state["bbox_head.3.bias"] = torch.zeros(5)
    torch.save({"model": state}, tmp_path / "bad.pth")
    code, out, err = run_main(capsys, "ground", str(IMAGE), "circle", "--checkpoint", str(tmp_path / "bad.pth"),
                              "--config", str(F / "Grounding_bbox.yaml"), "--tokenizer", str(F / "vocab.txt"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bbox_head.3.bias" in err


def test_command_dispatch(capsys, monkeypatch):
    from xvlm import cli

    calls = []
    fake = type(sys)("fake_bench")
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, cli.LAZY_COMMANDS["bench"], fake)
    assert cli.main(["bench", "--x", "1"]) == 3 and calls == [["--x", "1"]]
    assert cli.main(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0 and "ground" in capsys.readouterr().out


def test_ground_does_not_import_the_lazy_commands(capsys, monkeypatch):
    lazy = ("xvlm.train", "xvlm.training", "xvlm.training.cli", "xvlm.evaluate", "xvlm.bench")
    for module in lazy:
        monkeypatch.delitem(sys.modules, module, raising=False)
    code, _, err = run_main(capsys, "ground", str(IMAGE), "circle", *MODEL, "--json")
    assert code == 0, err
    assert not set(lazy) & set(sys.modules)
