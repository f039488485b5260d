"""The load test (benchmarks/loadtest.py) in its short mode: the app on a loopback port with the fixture model,
4 concurrent gradio_client clients, 24 requests mixing valid and invalid inputs. Nothing may fail, every invalid
request is rejected with its readable message, and the encoding cache stays within its bound."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("gradio_client")

CACHE_BOUND = 4          # smaller than the distinct images sent, so the short run evicts


@pytest.fixture(scope="module")
def loadtest(load_script):
    return load_script("benchmarks/loadtest.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory, loadtest):
    return loadtest.run_loadtest(requests=24, clients=4, model="fixture", cache_entries=CACHE_BOUND, n_images=6,
                                 big=False, timeout=240, startup_timeout=600,
                                 workdir=tmp_path_factory.mktemp("loadtest"), log=lambda *a: None)


def test_plan_covers_every_kind(loadtest):
    inputs = {"valid": [loadtest.ValidImage("a.png", (1, 1))], "tiny": loadtest.ValidImage("t.png", (1, 1)),
              "corrupt": "c.png", "truncated": "t.png", "bomb": "b.png"}
    plan = loadtest.plan_requests(24, inputs, seed=0)
    assert len(plan) == 24 and {r.kind for r in plan} == set(loadtest.KINDS)
    assert plan == loadtest.plan_requests(24, inputs, seed=0)            # seeded: the same mix every run


def test_runs_as_a_script_from_anywhere(tmp_path):
    """`python benchmarks/loadtest.py` (sys.path holds benchmarks/, not the repository) plans with xvlm.limits."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "loadtest.py"
    code = ("import runpy; m = runpy.run_path(%r); "
            "print(len(m['plan_requests'](3, {'valid': [m['ValidImage']('a.png', (1, 1))], 'tiny': "
            "m['ValidImage']('t.png', (1, 1)), 'corrupt': 'c', 'truncated': 't', 'bomb': 'b'}, 0)))" % str(script))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_nothing_fails(result):
    assert result["answered"] == result["requests"] == 24
    assert result["failed"] == 0, result["failures"]
    assert result["completed"] + result["rejected"] == 24
    assert result["ok"]


def test_every_invalid_request_is_rejected_with_its_message(result):
    assert result["all_invalid_rejected_with_message"]
    assert result["rejected"] == result["invalid_sent"] > 0
    for kind, row in result["by_kind"].items():
        if row["expect"] == "reject":
            assert row["rejected"] == row["n"] and row["completed"] == 0, kind
            assert row["example"], kind                                 # the message the client got
        else:
            assert row["completed"] == row["n"], kind
    assert "2,500 MP" in result["by_kind"]["bomb"]["example"]
    assert "/tmp" not in result["by_kind"]["corrupt"]["example"]          # no server paths in messages


def test_long_phrases_are_read_whole_by_the_official_fixture(result):
    """The fixture is an official checkpoint: like the official evaluation it reads a 30-word phrase whole (its cut is
    at 512 position embeddings), so no truncation note; the shipped model's 24-token budget is tested in test_inputs."""
    long_ = result["by_kind"]["long"]
    assert long_["n"] >= 1 and long_["completed"] == long_["n"] and long_["truncated_notes"] == 0


def test_cache_stays_within_its_bound_and_memory_is_sampled(result):
    cache, mem = result["cache"], result["memory"]
    assert cache["bound"] == CACHE_BOUND and cache["bounded"]
    assert cache["max_len"] <= CACHE_BOUND
    if cache["distinct_images_sent"] > CACHE_BOUND:                      # it filled up and evicted
        assert cache["max_len"] == CACHE_BOUND
        assert cache["vision_passes"] >= cache["distinct_images_sent"]
    assert mem["samples"] > 0 and mem["rss_end_mb"] > 0 and mem["rss_high_water_mb"] >= mem["rss_end_mb"] - 1


def test_latencies_and_report(result, tmp_path, loadtest):
    lat = result["latency"]
    assert 0 < lat["p50_s"] <= lat["p95_s"] <= lat["max_s"] and math.isfinite(lat["max_s"])
    text = loadtest.table(result)
    assert "| **all** |" in text and "failed" in text and "bound 4" in text
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    loadtest.append_markdown(md, result, "python benchmarks/loadtest.py --requests 24 --clients 4")
    out = md.read_text()
    assert out.startswith("# Results\n") and "## Load test" in out and "--requests 24 --clients 4" in out
