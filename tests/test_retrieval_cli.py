"""`python -m xvlm index` / `search`: resumable indexing with a report, search output, one-line errors, and sharded
encoding under torchrun (2 CPU processes, gloo) merged into the same index a single process builds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import cli
from xvlm.index import GalleryIndex

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
MODEL = ["--checkpoint", str(F / "checkpoint.pth"), "--config", str(F / "Grounding_bbox.yaml"),
         "--tokenizer", str(F / "vocab.txt"), "--device", "cpu"]
ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def folder(tmp_path) -> Path:
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for p in sorted((F / "gallery").glob("g[0-3]*.png")):
        shutil.copy(p, d / p.name)
    shutil.copy(F / "gallery" / "g4_tiny.png", d / "sub" / "g4_tiny.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "notes.txt").write_text("not an image, not listed")
    return d


def test_index_reports_resumes_and_search_prints_hits(capsys, folder, tmp_path):
    out = tmp_path / "idx"
    code, _, err = run(capsys, "index", folder, "--out", out, *MODEL)
    assert code == 0, err
    assert "added 5 image(s)" in err and "skipped:" in err and "broken.jpg" in err
    idx = GalleryIndex.load(out)
    assert sorted(idx.ids) == ["g0_beach.png", "g1_portrait.png", "g2_grass.png", "g3_exact384.png", "sub/g4_tiny.png"]
    shutil.copy(F / "gallery" / "g5_wide.png", folder / "g5_wide.png")
    shutil.copy(F / "gallery" / "g0_beach.png", folder / "again.png")
    code, _, err = run(capsys, "index", folder, "--out", out, *MODEL)     # resume: only the new files are read
    assert code == 0, err
    assert "added 1 image(s), 5 already indexed" in err
    assert "duplicate:" in err and "again.png has the same pixels as g0_beach.png" in err
    assert len(GalleryIndex.load(out)) == 6

    # search loads the model recorded in the index when none is given
    code, text, err = run(capsys, "search", out, "a tiny black square", "--k", "3", "--rerank", "4")
    assert code == 0, err
    ranked = [ln for ln in text.splitlines() if ln.strip().startswith(("1 ", "2 ", "3 "))]
    assert "ITM logit" in text and len(ranked) == 3
    code, text, err = run(capsys, "search", out, "a tiny black square", "--k", "3", "--rerank", "4", "--json",
                          "--out", tmp_path / "sheet.png", *MODEL)
    assert code == 0, err
    hits = [json.loads(line) for line in text.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(h["itm_logit"] is not None and len(h["box_xyxy"]) == 4 for h in hits)
    assert hits[0]["itm_logit"] >= hits[1]["itm_logit"] >= hits[2]["itm_logit"]
    assert (tmp_path / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["search", "{tmp}/nothing", "a circle"], "no gallery index in"),
    (["search", "{idx}", "   "], "empty phrase"),
    (["search", "{idx}", "circle", "--k", "0"], "--k must be >= 1"),
    (["search", "{idx}", "circle", "--out", "{tmp}/x.docx"], "unsupported figure format"),
    (["index", "{tmp}/nowhere", "--out", "{tmp}/i2"], "gallery folder not found"),
    (["index", "{tmp}/emptydir", "--out", "{tmp}/i3"], "no image files in"),
])
def test_user_errors_are_one_line(capsys, tmp_path, folder, args, words):
    idx = tmp_path / "idx"
    (tmp_path / "emptydir").mkdir()
    if "{idx}" in " ".join(args):
        assert run(capsys, "index", folder, "--out", idx, *MODEL)[0] == 0
    code, _, err = run(capsys, *[a.format(tmp=tmp_path, idx=idx) for a in args], *MODEL)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_index_with_only_unreadable_files_is_an_empty_gallery(capsys, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_text("no")
    code, _, err = run(capsys, "index", d, "--out", tmp_path / "idx", *MODEL)
    assert code == 2 and "empty gallery: no readable images" in err and "a.png" in err
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_torchrun_shards_merge_into_the_single_process_index(tmp_path, make_tiny_grounder):
    from xvlm.checkpoint import save_pretrained

    g = make_tiny_grounder(tmp_path)
    model_dir = tmp_path / "tiny"
    save_pretrained(g.model, model_dir)
    shutil.copy(g.tokenizer.vocab_file, model_dir / "vocab.txt")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((F / "gallery").glob("*.png")):
        shutil.copy(p, photos / p.name)
    # sorted files alternate between the ranks: rank 0 gets a_dup g1 g3 g5 h_dup, rank 1 g0 g2 g4 g6; so a_dup /
    # g2_grass is a duplicate across the shares (found by the merge), h_dup / g1_portrait one within rank 0's
    shutil.copy(F / "gallery" / "g2_grass.png", photos / "a_dup.png")
    shutil.copy(F / "gallery" / "g1_portrait.png", photos / "h_dup.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "xvlm", "index", str(photos), "--out", str(tmp_path / "sharded"), "--model", str(model_dir),
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "g2_grass.png has the same pixels as a_dup.png" in proc.stderr      # found by the merge
    assert "[rank 0] duplicate:" in proc.stderr and "h_dup.png has the same pixels as g1_portrait.png" in proc.stderr
    assert not (tmp_path / "sharded" / "shards").exists()
    sharded = GalleryIndex.load(tmp_path / "sharded")
    single = g.index_images(sorted(photos.glob("*.png")), tmp_path / "single", root_for_ids=photos)
    order = [sharded.ids.index(i) for i in single.ids]
    assert sorted(sharded.ids) == sorted(single.ids) and len(single) == 7
    np.testing.assert_allclose(sharded.vectors[order], single.vectors, atol=1e-5)
    assert sharded.model["fingerprint"] == single.model["fingerprint"]
