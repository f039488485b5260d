"""scripts/regenerate.py: the card's generated blocks come from the eval reports, and nothing else changes."""
from __future__ import annotations

import json

import pytest


def test_the_card_blocks_are_the_shipped_reports(load_script):
    """The card's generated blocks are exactly what the script makes of weights/eval*.json (run it after an eval)."""
    script = load_script("scripts/regenerate.py")
    blocks = script.generated_blocks(json.loads(script.EVAL_JSON.read_text()), json.loads(script.CROSS_JSON.read_text()))
    card = script.CARD.read_text()
    assert script.update_card(card, blocks) == card
    cross = json.loads(script.CROSS_JSON.read_text())["cross_renderer"]
    assert f"{cross['grounding']['all']['acc@0.5']:.3f}" in blocks["cross-renderer"]
    assert "shape only" in blocks["cross-renderer"]


def test_update_card_replaces_only_the_named_blocks(load_script):
    script = load_script("scripts/regenerate.py")
    card = ("intro\n<!-- begin generated: a -->\nold a\n<!-- end generated: a -->\nmiddle\n"
            "<!-- begin generated: b -->\nold b\nmore\n<!-- end generated: b -->\nend\n")
    new = script.update_card(card, {"b": "new b"})
    assert new == card.replace("old b\nmore", "new b")
    with pytest.raises(ValueError, match="no generated block 'c'"):
        script.update_card(card, {"c": "x"})


def test_dry_run_lists_the_commands(capsys, load_script):
    script = load_script("scripts/regenerate.py")
    assert script.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--probe --json" in out and "--cross-renderer 300 --cross-only" in out and "make_assets.py" in out
    lines = [line for line in out.splitlines() if line.startswith("$")]
    assert "calibrate" in lines[0] and "--write" in lines[0], "calibration comes first: the evals report its verdict"
    assert any("--retrieval" in line and "eval_retrieval.json" in line for line in lines)
