"""The official RefCOCO / RefCOCO+ box evaluation (`Grounding_bbox.py --evaluate` of X-VLM and X²-VLM), for a user
who has the data:

    python -m xvlm refcoco --checkpoint x2vlm_large_1b_grounding/model_state_epoch_best.th \
        --config configs/finetune/refcoco_grounding_large.yaml --tokenizer data/bert-large-uncased \
        --test-file data/finetune/refcoco+_val.json data/finetune/refcoco+_test.json \
        --refcoco-data data/finetune --image-root images/coco [--json results.json]

What the official script does, restated: every record {image, text, ref_id} of the test JSON files is grounded
(pre_caption + tokenizer + bbox head, `Grounder.ground`; records on one image share its encoding); the predicted
(cx, cy, w, h) is scaled by the width and height that `instances.json` gives the image (float32, as the official
`grounding_eval_bbox`), turned into [x, y, w, h] and compared with the box of the referred annotation
(`refs(unc).p` -> ann_id -> `instances.json`) by the official `computeIoU` (inclusive pixel convention, the "- 1" /
"+ 1"); Acc@0.5 per split (val, testA, testB).

`refs(unc).p` is a pickle. It is read by `read_refs_pickle`, an unpickler that admits plain containers only (dict,
list, tuple, set, str, numbers, None): any other global - the way a pickle runs code - is refused before it is
resolved, so a tampered download cannot execute anything. Never `pickle.load` a downloaded file.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("val", "testA", "testB")
# globals a pickle of plain containers may name (protocol 2 writes sets through them; Python 2 calls it __builtin__)
_PLAIN_GLOBALS = {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset")}
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PLAIN_GLOBALS:
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only plain containers are admitted")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: only plain containers are admitted")


def read_refs_pickle(path: str | Path) -> list[dict]:
    """The RefCOCO `refs(<splitBy>).p`: a list of dicts with ref_id, ann_id, image_id, split (and sentences ...).
    Raises ValueError for anything else, including a pickle that names any non-container global."""
    path = Path(path)
    try:
        refs = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, IndexError, TypeError) as e:
        raise ValueError(f"{path} is not a RefCOCO refs pickle of plain containers: {e}") from e
    if not isinstance(refs, list) or not all(isinstance(r, dict) and all(k in r for k in _REF_KEYS) for r in refs):
        raise ValueError(f"{path}: expected a list of refs, each a dict with {', '.join(_REF_KEYS)}")
    return refs


@dataclass
class Refer:
    """The part of the official `REFER` index the evaluation reads."""
    refs: dict[int, dict]          # ref_id -> ref (split, image_id, ann_id)
    boxes: dict[int, list[float]]  # ref_id -> [x, y, w, h] of its annotation
    sizes: dict[int, tuple[float, float]]   # image_id -> (width, height)

    @classmethod
    def load(cls, refcoco_data: str | Path, dataset: str = "refcoco+", split_by: str = "unc") -> "Refer":
        root = Path(refcoco_data) / dataset
        refs = read_refs_pickle(root / f"refs({split_by}).p")
        instances = json.loads((root / "instances.json").read_text())
        anns = {a["id"]: a for a in instances["annotations"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in instances["images"]}
        try:
            boxes = {r["ref_id"]: [float(v) for v in anns[r["ann_id"]]["bbox"]] for r in refs}
        except KeyError as e:
            raise ValueError(f"{root}: a ref names annotation {e.args[0]}, which instances.json does not have") from None
        return cls({r["ref_id"]: r for r in refs}, boxes, sizes)


def official_iou(box1, box2) -> float:
    """The official `computeIoU` on [x, y, w, h] boxes (inclusive pixels). `box2` may hold float32 tensors, as the
    official prediction does; the arithmetic then runs in float32 exactly as there."""
    inter_x1, inter_y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1) if inter_x1 < inter_x2 and inter_y1 < inter_y2 else 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(float(inter) / union)


def official_xywh(cxcywh, width: float, height: float) -> torch.Tensor:
    """The bbox head's (cx, cy, w, h) as the official evaluation turns it into pixels [x, y, w, h] (float32)."""
    coord = torch.as_tensor(cxcywh, dtype=torch.float32).clone()
    coord[0::2] *= width
    coord[1::2] *= height
    coord[0] -= coord[2] / 2
    coord[1] -= coord[3] / 2
    return coord


def read_test_records(paths) -> list[dict]:
    records = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, list) or not all(isinstance(r, dict) and {"image", "text", "ref_id"} <= set(r)
                                                 for r in data):
            raise ValueError(f"{path}: expected a JSON list of {{image, text, ref_id}} records")
        records += data
    return records


def evaluate(g, records: list[dict], refer: Refer, image_root: str | Path = ".", progress: bool = True) -> dict:
    """Acc@0.5 per split of the records present (the official script divides by every split's count, so it needs
    all three), with the counts and each record's IoU."""
    from tqdm import tqdm

    by_image: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r["ref_id"] not in refer.refs:
            raise ValueError(f"ref_id {r['ref_id']} of the test file is not in the refs pickle")
        by_image[r["image"]].append(i)
    ious, truncated = [0.0] * len(records), 0
    for image, idx in tqdm(by_image.items(), desc="RefCOCO images", disable=not progress):
        results = g.ground(Path(image_root) / image, [records[i]["text"] for i in idx])
        truncated += sum("truncated" in res.notes for res in results)
        for i, res in zip(idx, results):
            ref = refer.refs[records[i]["ref_id"]]
            pred = official_xywh(res.box_cxcywh, *refer.sizes[ref["image_id"]])
            ious[i] = official_iou(refer.boxes[ref["ref_id"]], pred)
    counts, hits = defaultdict(int), defaultdict(int)
    for r, iou in zip(records, ious):
        split = refer.refs[r["ref_id"]]["split"]
        counts[split] += 1
        hits[split] += iou >= 0.5
    report = {f"{s}_d": hits[s] / counts[s] for s in SPLITS if counts[s]}
    return report | {"counts": {s: counts[s] for s in SPLITS if counts[s]}, "truncated": truncated, "ious": ious}


def main(argv: list[str] | None = None) -> int:
    from .cli import UsageError, _fail, _load_grounder, _one_line, _user_errors

    p = argparse.ArgumentParser(prog="python -m xvlm refcoco", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="official X-VLM / X²-VLM grounding checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="its official task YAML (e.g. configs/finetune/refcoco_grounding_large.yaml)")
    src.add_argument("--preset", help="or a built-in preset (e.g. x2vlm-large-1b-grounding)")
    p.add_argument("--tokenizer", required=True, help="BERT vocab.txt or its folder")
    p.add_argument("--test-file", nargs="+", required=True, help="official test JSON(s): [{image, text, ref_id}]")
    p.add_argument("--refcoco-data", required=True, help="folder holding refcoco+/refs(unc).p and instances.json")
    p.add_argument("--dataset", default="refcoco+")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--image-root", default=".", help="folder the records' image paths are relative to")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--json", help="write the report (accuracies, counts, per-record IoU) here")
    a = p.parse_args(argv)
    try:
        refer = Refer.load(a.refcoco_data, a.dataset, a.split_by)
        records = read_test_records(a.test_file)
        g = _load_grounder(a)      # official Grounders cut phrases only at the position table, as this evaluation
        report = evaluate(g, records, refer, a.image_root)
    except (UsageError, OSError, *_user_errors()) as e:
        return _fail(_one_line(e))
    for key in (f"{s}_d" for s in SPLITS):
        if key in report:
            print(f"{key}: {report[key]:.3f}  ({report['counts'][key[:-2]]} expressions)")
    if report["truncated"]:
        print(f"note: {report['truncated']} expressions were longer than the position table and truncated")
    if a.json:
        Path(a.json).write_text(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
