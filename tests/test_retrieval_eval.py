"""`python -m xvlm eval --retrieval`: X-VLM's retrieval protocol on synthetic scenes at image and region granularity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder, retrieval_metrics
from xvlm import retrieval_eval as re_eval
from xvlm.evaluate import eval_scenes
from xvlm.evaluate import main as eval_main

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"


@pytest.fixture(scope="module")
def g(load_official) -> Grounder:
    return load_official(name="fixture")


@pytest.fixture(scope="module")
def scenes():
    return eval_scenes(6)


def test_image_granularity_is_the_official_protocol_on_scene_captions(g, scenes):
    row = re_eval.image_retrieval(g, scenes, k_test=4)
    s = g.retrieval_scores([sc.image for sc in scenes], [sc.caption for sc in scenes], k_test=4)
    expected = retrieval_metrics(s.i2t, s.t2i, list(range(6)), [[i] for i in range(6)])
    assert row["n"] == 6 and row["k_test"] == 4
    assert {k: row[k] for k in expected} == pytest.approx(expected)
    assert row["itc_only"] == pytest.approx(retrieval_metrics(s.itc, s.itc.T, list(range(6)), [[i] for i in range(6)]))


def test_region_candidates_are_box_concepts(g, scenes, monkeypatch):
    captured = {}
    real = re_eval.official_scores

    def spy(g_, itm_m, embeds, tokens, masks, t_itc, t_itm, k):
        captured.update(embeds=embeds, tokens=tokens, masks=masks, texts=t_itc)
        return real(g_, itm_m, embeds, tokens, masks, t_itc, t_itm, k)

    monkeypatch.setattr(re_eval, "official_scores", spy)
    row = re_eval.region_retrieval(g, scenes, k_test=3)
    regions = [s.regions[0] for s in scenes if s.regions]
    assert row["n"] == len({r.text for r in regions})
    # the ITC feature of a candidate is the box's concept, as Grounder.concept_scores computes it
    sims = (captured["embeds"] @ captured["texts"].embeds.T).numpy()
    first = next(s for s in scenes if s.regions)
    direct = g.concept_scores(first.image, [first.regions[0].text], [first.regions[0].box])
    assert sims[0, 0] == pytest.approx(float(direct[0, 0]), abs=1e-5)
    # fusion sees only the box's patches, with the concept as token 0
    mask = captured["masks"][0]
    assert 0 < int(mask[0, 1:].sum()) < mask.shape[1] - 1
    tokens = g.encode_image(first.image).tokens
    assert not torch.allclose(captured["tokens"][0][0, 0], tokens[0, 0])
    assert torch.equal(captured["tokens"][0][0, 1:], tokens[0, 1:])


def test_eval_retrieval_command_prints_both_granularities(g, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Grounder, "from_pretrained", classmethod(lambda cls, *a, **k: g))
    out = tmp_path / "r.json"
    assert eval_main(["--retrieval", "--scenes", "5", "--k-test", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TR@1" in text and "IR@10" in text and "\nimage " in text and "\nregion " in text
    report = json.loads(out.read_text())
    assert set(report["retrieval_protocol"]) == {"image", "region"}
    assert all(0 <= report["retrieval_protocol"]["image"][k] <= 100 for k in ("txt_r1", "img_r1"))
    assert np.isfinite(report["retrieval_protocol"]["region"]["r_mean"])


def test_retrieval_with_a_number_is_refused_and_names_the_option_it_meant(capsys, monkeypatch):
    """`--retrieval` runs the protocol; the grounding eval's candidate count is `--retrieval-candidates N`, and the
    old `--retrieval N` spelling is refused before any model loads, naming it."""
    monkeypatch.setattr(Grounder, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("model loaded")))
    with pytest.raises(SystemExit) as e:
        eval_main(["--retrieval", "20"])
    assert e.value.code == 2 and "--retrieval-candidates N" in capsys.readouterr().err


def test_official_retrieval_test_file_gives_the_official_recall(capsys, tmp_path):
    """`eval --retrieval --re-json` on the fixture's re_test.json (the official re_eval_dataset format) with the
    fixture checkpoint: the recall the official Retrieval.py evaluation gave (stable tie order)."""
    r = json.loads((F / "retrieval.json").read_text())
    out = tmp_path / "re.json"
    code = eval_main(["--retrieval", "--re-json", str(F / "gallery" / "re_test.json"), "--image-root", str(F),
                      "--k-test", "5", "--checkpoint", str(F / "checkpoint.pth"), "--config",
                      str(F / "Grounding_bbox.yaml"), "--tokenizer", str(F / "vocab.txt"), "--device", "cpu",
                      "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n_images"] == 7 and report["n_texts"] == 14 and report["k_test"] == 5
    for key, value in r["ranks"]["recall_stable_argsort"].items():
        assert report[key] == pytest.approx(value), key
    with pytest.raises(ValueError, match="not an official retrieval test file"):
        re_eval.load_re_json(F / "retrieval.json")
