"""The official RefCOCO+ box evaluation (`python -m xvlm refcoco`) on a miniature dataset in the official layout
written here: the X²-VLM fixture's 9 (image, text, ref_id) records as the test JSON, a `refs(unc).p` pickle of plain
containers and an `instances.json` whose boxes are the official prediction (hit) or a box beside it (miss). The
refs pickle is read with the restricted unpickler; a pickle that would run code is refused without running it."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from xvlm import Grounder
from xvlm.preprocess import Tokenizer
from xvlm.refcoco import Refer, evaluate, main, official_iou, official_xywh, read_refs_pickle

torch.set_num_threads(1)
X2 = Path(__file__).parent / "fixtures" / "official-x2vlm-small"
YAML, TEXT = X2 / "refcoco_grounding.yaml", X2 / "bert-base-uncased-tiny"
CASES = json.loads((X2 / "cases.json").read_text())["cases"]
SPLIT = ["val", "val", "testA", "testA", "testA", "testB", "testB", "testB", "testB"]
HIT = [True, False, True, True, False, True, False, False, False]      # val 1/2, testA 2/3, testB 1/4


def shifted(box, dx):
    return [box[0] + dx, box[1], box[2], box[3]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """data/refcoco+/refs(unc).p + instances.json, test JSON, images under images/ (the official folder layout)."""
    root = tmp_path_factory.mktemp("refcoco")
    (root / "refcoco+").mkdir()
    (root / "images").mkdir()
    for name in {c["image"] for c in CASES}:
        shutil.copy(X2 / name, root / "images" / name)
    image_ids = {name: i + 100 for i, name in enumerate(sorted({c["image"] for c in CASES}))}
    refs, anns = [], []
    for i, c in enumerate(CASES):
        box = c["box_xywh_official_eval"]
        box = box if HIT[i] else shifted(box, box[2] + 5)       # beside the prediction: IoU 0
        refs.append({"ref_id": i, "ann_id": 1000 + i, "image_id": image_ids[c["image"]], "split": SPLIT[i],
                     "category_id": 1, "sent_ids": [i], "sentences": [{"sent_id": i, "raw": c["phrase"],
                                                                       "tokens": c["phrase"].split()}]})
        anns.append({"id": 1000 + i, "image_id": image_ids[c["image"]], "bbox": box, "category_id": 1})
    images = [{"id": image_ids[c["image"]], "width": c["image_size_wh"][0], "height": c["image_size_wh"][1],
               "file_name": c["image"]} for c in {c["image"]: c for c in CASES}.values()]
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "refcoco+" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "shape"}]}))
    (root / "refcoco+_test.json").write_text(json.dumps(
        [{"image": c["image"], "text": c["phrase"], "ref_id": i} for i, c in enumerate(CASES)]))
    return root


def test_official_box_conversion_and_iou():
    c = CASES[4]
    xywh = official_xywh(c["output_coord"], *c["image_size_wh"])
    assert xywh.dtype == torch.float32 and xywh.tolist() == c["box_xywh_official_eval"]     # bit for bit
    assert official_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert official_iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)  # inclusive pixels: 5 x 10 overlap
    assert official_iou([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0


def test_evaluation_counts_hits_per_split(dataset, x2vlm_grounder):
    g = x2vlm_grounder
    refer = Refer.load(dataset, "refcoco+", "unc")
    records = json.loads((dataset / "refcoco+_test.json").read_text())
    report = evaluate(g, records, refer, dataset / "images", progress=False)
    assert report["counts"] == {"val": 2, "testA": 3, "testB": 4} and report["truncated"] == 0
    assert (report["val_d"], report["testA_d"], report["testB_d"]) == (1 / 2, 2 / 3, 1 / 4)
    assert [iou > 0.999 for iou in report["ious"]] == HIT and all(iou == 0 for iou, h in zip(report["ious"], HIT)
                                                                   if not h)
    assert g.stats["vision_passes"] == 3                     # one encoding per image, its expressions batched


def test_cli_prints_the_official_metrics(dataset, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["--checkpoint", str(X2 / "checkpoint.pth"), "--config", str(YAML), "--tokenizer", str(TEXT),
               "--test-file", str(dataset / "refcoco+_test.json"), "--refcoco-data", str(dataset),
               "--image-root", str(dataset / "images"), "--device", "cpu", "--json", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["val_d: 0.500  (2 expressions)", "testA_d: 0.667  (3 expressions)",
                     "testB_d: 0.250  (4 expressions)"]
    assert json.loads(out.read_text())["testA_d"] == pytest.approx(2 / 3)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "ann_id": 0, "image_id": 0, "split": "val", "x": evil}], protocol=2))
    with pytest.raises(ValueError, match="refused global .*system"):
        read_refs_pickle(path)
    assert not marker.exists()


def test_refs_pickle_must_be_plain_refs(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "ann_id": 0, "image_id": 0, "split": "val",
                                    "tags": {"a", "b"}, "t": (1, 2.5, None, True)}], protocol=2))
    assert read_refs_pickle(path)[0]["tags"] == {"a", "b"}       # sets and tuples are plain containers
    path.write_bytes(pickle.dumps({"ref_id": 0}))
    with pytest.raises(ValueError, match="expected a list of refs"):
        read_refs_pickle(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a RefCOCO refs pickle"):
        read_refs_pickle(path)


def test_cli_reports_missing_data_in_one_line(tmp_path, capsys):
    rc = main(["--checkpoint", str(X2 / "checkpoint.pth"), "--config", str(YAML), "--tokenizer", str(TEXT),
               "--test-file", str(tmp_path / "t.json"), "--refcoco-data", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "refs(unc).p" in err[0]


def test_the_command_does_not_truncate_long_expressions_like_the_official_evaluation(dataset, tmp_path):
    long_text = " ".join(["smallest"] * 30)                   # 30 words, 2 WordPieces each: 62 tokens with [CLS] [SEP]
    test = tmp_path / "long.json"
    test.write_text(json.dumps([{"image": CASES[0]["image"], "text": long_text, "ref_id": 0}]))
    g = Grounder.from_official(X2 / "checkpoint.pth", config=YAML, tokenizer=TEXT, device="cpu")
    assert len(g.tokenizer([long_text]).input_ids[0]) == 62        # official Grounders: bounded by positions only
    g.tokenizer = Tokenizer.for_config(TEXT, dataclasses.replace(g.model.cfg, grounding_truncation="max_tokens"))
    assert g.tokenizer.max_tokens == 40                              # the YAML's training bound: truncation counted
    refer = Refer.load(dataset, "refcoco+", "unc")
    assert evaluate(g, json.loads(test.read_text()), refer, dataset / "images", progress=False)["truncated"] == 1
    out = tmp_path / "report.json"
    assert main(["--checkpoint", str(X2 / "checkpoint.pth"), "--config", str(YAML), "--tokenizer", str(TEXT),
                 "--test-file", str(test), "--refcoco-data", str(dataset), "--image-root", str(dataset / "images"),
                 "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["truncated"] == 0
