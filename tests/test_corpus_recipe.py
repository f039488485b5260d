"""The training recipe for the varied corpus (issue #26): data, corpus choice, and the words it records."""
from __future__ import annotations

import dataclasses
import json

from xvlm import Grounder
from xvlm.data import VOCAB_WORDS
from xvlm.training.loop import train
from xvlm.training.recipes import RECIPES, model_config, with_stage_steps
from xvlm.training.sources import SyntheticSource


def test_the_varied_recipe_is_the_default_recipe_on_the_varied_corpus_and_a_16x16_grid():
    r, base = RECIPES["shapes-varied"], RECIPES["shapes"]
    assert r.corpus == "varied" and base.corpus == "train"
    assert model_config(r).vision.grid_size == 16 and model_config(base).vision.grid_size == 12
    assert [s.name for s in r.stages] == [s.name for s in base.stages]
    assert r.stages[1].steps > 1.5 * base.stages[1].steps
    cycle = RECIPES["shapes-varied-cycle"]        # for --init weights/xvlm-shapes --start-stage grounding
    assert cycle.corpus == "varied" and cycle.model == base.model and cycle.seed not in (base.seed, 1)
    assert not any(s.align_cross_attention for s in cycle.stages)
    again = with_stage_steps(base, grounding=7)
    assert [s.steps for s in again.stages] == [base.stages[0].steps, 7, base.stages[2].steps]


def test_the_source_draws_the_recipes_corpus():
    varied = SyntheticSource(0, "varied").batch(3, 0, 6)
    default = SyntheticSource(0).batch(3, 0, 6)
    assert all(min(s.image.size) >= 150 for s in varied)
    assert all(max(s.image.size) <= 512 for s in default)
    assert [s.image.size for s in varied] != [s.image.size for s in default]


def test_a_tiny_run_on_the_varied_corpus_trains_every_stage_and_records_its_words(tmp_path):
    recipe = dataclasses.replace(RECIPES["shapes-tiny"], corpus="varied")
    train(recipe, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in log] == [s.name for s in recipe.stages for _ in range(s.steps)]
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["recipe"]["corpus"] == "varied"
    g = Grounder.from_pretrained(tmp_path / "run" / "final", device="cpu")
    assert g.model.cfg.words == tuple(VOCAB_WORDS)
    assert g.ground(SyntheticSource(1, "varied").batch(0, 0, 1)[0].image, "the cat").notes["unknown_words"] == ["cat"]


def test_stage_steps_from_the_command_line():
    import pytest
    from xvlm.training.cli import parse_stage_steps

    recipe = RECIPES["shapes-varied"]
    steps = parse_stage_steps(["grounding=9000", "grounding-fusion=400"], recipe)
    assert [s.steps for s in with_stage_steps(recipe, **steps).stages] == [1000, 9000, 400]
    for bad in (["grounding"], ["stage2=10"], ["grounding=0"], ["grounding=x"]):
        with pytest.raises(ValueError, match="--stage-steps"):
            parse_stage_steps(bad, recipe)
    with pytest.raises(SystemExit) as e:
        from xvlm.training.cli import main
        main(["--recipe", "shapes-varied", "--out", "unused", "--stage-steps", "stage2=10"])
    assert e.value.code == 2
