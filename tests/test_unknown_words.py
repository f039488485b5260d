"""Unknown words (issue #26): listed in notes["unknown_words"] by the Grounder, the CLI and the JSON export; the app
warns beside the phrase and says what the model knows and how well it measured."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app import callbacks as cb
from app.knowledge import describe_knowledge, measured_accuracy
from xvlm import Grounder
from xvlm.config import XVLMConfig
from xvlm.data import VOCAB_WORDS
from xvlm.grounder import DEFAULT_WEIGHTS
from xvlm.preprocess import Tokenizer
from xvlm.vocabulary import known_word_groups, unknown_words

ROOT = Path(__file__).resolve().parent.parent
F = ROOT / "tests" / "fixtures" / "official-xvlm-small"
IMAGE = np.full((96, 128, 3), 240, np.uint8)


@pytest.fixture(scope="module")
def shapes() -> Grounder:
    return Grounder.from_pretrained(device="cpu")


def test_the_shipped_vocabulary_hides_unknown_words_so_the_config_lists_the_known_ones(shapes):
    assert "[UNK]" not in shapes.tokenizer.tokens("the cat")           # c ##a ##t: the tokenizer cannot tell
    assert shapes.model.cfg.words == tuple(VOCAB_WORDS)
    assert unknown_words("the cat left of the red circle", shapes.tokenizer, set(VOCAB_WORDS)) == ["cat"]
    assert unknown_words("the big grey square at the top", shapes.tokenizer, set(VOCAB_WORDS)) == []
    assert unknown_words("a dog and a dog", shapes.tokenizer, set(VOCAB_WORDS)) == ["dog"]


def test_an_open_vocabulary_flags_the_words_that_become_unk():
    tok = Tokenizer(F / "vocab.txt")
    word = next(w for w in ("zebra", "cat", "giraffe") if "[UNK]" in tok.tokens(w))
    assert unknown_words(f"the {word} on the left", tok, None) == [word]
    assert unknown_words("the red circle on the left", tok, None) == [
        w for w in ("red", "circle") if "[UNK]" in tok.tokens(w)]


def test_grounder_notes_unknown_words_per_phrase(shapes):
    cat, circle = shapes.ground(IMAGE, ["The CAT, left of the red circle!", "the red circle"])
    assert cat.notes["unknown_words"] == ["cat"] and "unknown_words" not in circle.notes
    assert cat.to_dict()["notes"]["unknown_words"] == ["cat"]


def test_config_round_trip_keeps_the_words():
    cfg = XVLMConfig(words=("red", "circle"))
    again = XVLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.words == ("red", "circle") and XVLMConfig.from_dict({}).words is None


def test_cli_lists_unknown_words(capsys):
    from xvlm.cli import main
    from PIL import Image
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "img.png"
        Image.fromarray(IMAGE).save(path)
        assert main(["ground", str(path), "the cat", "the red circle", "--json", "--device", "cpu"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert rows[0]["notes"]["unknown_words"] == ["cat"] and "unknown_words" not in rows[1]["notes"]
        assert main(["ground", str(path), "a purple giraffe", "--device", "cpu"]) == 0
        assert "note unknown_words: giraffe" in capsys.readouterr().out


def test_app_warns_beside_the_phrase_and_exports_the_words(shapes, tmp_path):
    view = cb.ground_and_render(shapes, IMAGE, "the cat\nthe red circle", gradcam=False, out_dir=tmp_path)
    assert view.ok
    assert "Phrase 1: the model does not know 'cat'" in view.message and "Phrase 2: the model" not in view.message
    assert view.scores["data"][0][1] == "the cat  ⚠️ unknown: cat" and view.scores["data"][1][1] == "the red circle"
    assert view.payload["results"][0]["notes"]["unknown_words"] == ["cat"]
    api = cb.ground_json(shapes, IMAGE, "two cats")
    assert api["results"][0]["notes"]["unknown_words"] == ["cats"]


def test_app_states_what_the_model_knows_and_its_measured_accuracy(shapes, tmp_path):
    text = cb.describe_model(shapes, DEFAULT_WEIGHTS)
    groups = known_word_groups(shapes.model.cfg.words)
    assert set(groups["colours"]) >= {"red", "grey", "purple"} and "rectangle" in groups["shapes"]
    assert "left of" in groups["relations"] and "big" in groups["sizes"]
    assert "knows only these words" in text and "triangle" in text and "above" in text
    report = json.loads((DEFAULT_WEIGHTS.parent / "eval.json").read_text())
    assert f"{report['grounding']['all']['acc@0.5']:.1%}" in text
    cross = json.loads((DEFAULT_WEIGHTS.parent / "eval-cross-renderer.json").read_text())["cross_renderer"]
    assert f"{cross['grounding']['all']['acc@0.5']:.1%}" in text and "independent renderer" in text
    for found in (report["found"], cross["found"]):           # the verdict's rates, next to the boxes'
        assert f"{found['absent_rejected']:.0%} of absent objects called not found and " \
               f"{found['present_kept']:.0%} of present ones found" in text
    # reports are matched to the model by name: another folder gets none
    other = tmp_path / "other-model"
    other.mkdir()
    (tmp_path / "eval.json").write_text(json.dumps({"model": "xvlm-shapes", "grounding": {"all": {}}}))
    assert measured_accuracy(other) == {} and measured_accuracy(None) == {}
    assert "no eval report on file" in describe_knowledge(shapes, other)


def test_an_open_vocabulary_model_says_so(official_grounder):
    g = official_grounder
    text = describe_knowledge(g)
    assert "open (WordPiece, 72 tokens)" in text and "no eval report" in text
