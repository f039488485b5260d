"""Models from a Hugging Face Hub repository (issue #27 item 2), offline: the test lays out a hub cache the way
huggingface_hub does (models--org--name/{refs,snapshots}) and nothing may reach the network (HF_HUB_OFFLINE=1 and
an unroutable endpoint). Also the app's --model org/name, and ZeroGPU's decorator with a stand-in `spaces` module
(item 3)."""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder
from xvlm.cli import main as cli_main
from xvlm.grounder import DEFAULT_WEIGHTS
from xvlm.hub import is_repo_id, resolve_model

torch.set_num_threads(1)
IMAGE = Path(__file__).parent / "fixtures" / "official-xvlm-small" / "img_b.png"
REPO = "someone/xvlm-shapes"
MAIN, TAGGED = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A cache with two revisions of REPO: main (the shipped model) and v1 (the same weights, a different name in
    its card), and the network switched off."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--xvlm-shapes"
    for commit in (MAIN, TAGGED):
        shutil.copytree(DEFAULT_WEIGHTS, repo / "snapshots" / commit)
    (repo / "snapshots" / TAGGED / "README.md").write_text("v1\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")    # were anything to try the network, it fails at once
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_repo_id_resolves_from_the_cache(hub_cache):
    assert resolve_model(REPO, cache_dir=hub_cache) == hub_cache / "models--someone--xvlm-shapes" / "snapshots" / MAIN
    assert resolve_model(REPO, revision="v1", cache_dir=hub_cache).name == TAGGED
    assert resolve_model(REPO, revision=TAGGED, cache_dir=hub_cache).name == TAGGED


def test_from_pretrained_repo_id_equals_the_local_folder(hub_cache):
    hub = Grounder.from_pretrained(REPO, cache_dir=hub_cache, device="cpu")
    local = Grounder.from_pretrained(DEFAULT_WEIGHTS, device="cpu")
    assert hub.name == REPO
    a, b = hub.ground(IMAGE, "a red circle"), local.ground(IMAGE, "a red circle")
    assert a.box_xyxy == b.box_xyxy and a.itm == b.itm and np.array_equal(a.patch_heatmap, b.patch_heatmap)


def test_offline_without_the_model_in_cache_is_a_clear_error(hub_cache):
    with pytest.raises(FileNotFoundError, match="not in the local cache.*HF_HUB_OFFLINE"):
        Grounder.from_pretrained("someone/not-cached", cache_dir=hub_cache, device="cpu")
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        resolve_model(REPO, revision="no-such-branch", cache_dir=hub_cache)


def test_an_existing_local_folder_wins(hub_cache, tmp_path, monkeypatch):
    local = tmp_path / "work" / "someone" / "xvlm-shapes"
    shutil.copytree(DEFAULT_WEIGHTS, local)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model(REPO, cache_dir=hub_cache) == Path(REPO)
    with pytest.raises(ValueError, match="revision"):
        resolve_model(REPO, revision="v1", cache_dir=hub_cache)


def test_names_that_are_not_repo_ids():
    assert is_repo_id("org/name") and is_repo_id("Org-1/na.me_2")
    for bad in ("name", "a/b/c", "../x", "/abs/path", "org/", "org/../x"):
        assert not is_repo_id(bad), bad
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        resolve_model("no/such/folder")


def test_cli_ground_takes_a_repo_id(hub_cache, capsys):
    assert cli_main(["ground", str(IMAGE), "a red circle", "--model", REPO, "--revision", "v1", "--json",
                     "--device", "cpu"]) == 0
    assert '"phrase": "a red circle"' in capsys.readouterr().out
    assert cli_main(["ground", str(IMAGE), "a red circle", "--model", "someone/missing", "--device", "cpu"]) == 2
    assert "not in the local cache" in capsys.readouterr().err


def test_app_takes_a_repo_id(hub_cache, monkeypatch, load_script):
    import app as app_module  # noqa: F401  (the package; app.py is the script)
    from app.models import ModelRegistry, specs_from_options

    specs = specs_from_options(model=REPO, revision="v1", default_weights=None, precision="fp32")
    assert [s.name for s in specs] == [f"{REPO}@v1 (Hub)"] and specs[0].problems() == []
    assert specs[0].kwargs == {"revision": "v1", "precision": "fp32"}
    g = ModelRegistry(specs).get()
    assert g.ground(IMAGE, "a red circle").box_xyxy is not None
    script = load_script("app.py")
    args = script.parse_args([], env={"XVLM_MODEL": REPO, "XVLM_PRECISION": "int8"})
    assert (args.model, args.precision) == (REPO, "int8")


# --- ZeroGPU (item 3) ----------------------------------------------------------------------------------------------
def stand_in_spaces(calls: list) -> types.ModuleType:
    mod = types.ModuleType("spaces")

    def GPU(duration=60):                     # noqa: N802 - the real API's name
        def wrap(fn):
            def wrapped(*a, **k):
                calls.append((fn.__name__, duration))
                return fn(*a, **k)
            wrapped.__wrapped__ = fn
            return wrapped
        return wrap
    mod.GPU = GPU
    return mod


def test_gpu_work_runs_under_spaces_gpu_when_importable(monkeypatch):
    from app import zerogpu
    from app.models import ModelRegistry
    from app.ui import build_demo

    calls: list = []
    monkeypatch.setitem(sys.modules, "spaces", stand_in_spaces(calls))
    assert zerogpu.gpu(len)([1, 2]) == 2 and calls == [("len", zerogpu.DURATION_S)]
    registry = ModelRegistry([])
    registry.add("m", Grounder.from_pretrained(device="cpu"))
    demo = build_demo(registry)
    api = next(f for f in demo.fns.values() if f.api_name == "ground")
    calls.clear()
    out = api.fn(str(IMAGE), "a red circle")
    assert calls == [("api_ground", zerogpu.DURATION_S)] and out["results"][0]["phrase"] == "a red circle"
    # every named endpoint (grounding, search, analysis) does its model work under spaces.GPU
    model_work = {"ground", "search", "counterfactuals", "describe_region", "word_maps"}
    named = {f.api_name: f.fn for f in demo.fns.values() if f.api_name in model_work}
    assert set(named) == model_work
    assert [n for n, fn in named.items() if not hasattr(fn, "__wrapped__")] == []
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert zerogpu.on_zerogpu()


def test_gpu_is_a_no_op_without_spaces(monkeypatch):
    from app import zerogpu

    monkeypatch.setitem(sys.modules, "spaces", None)          # import spaces -> ImportError
    assert zerogpu.gpu(len) is len and zerogpu.gpu(duration=5)(len) is len
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert not zerogpu.on_zerogpu()
