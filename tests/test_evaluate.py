"""The eval command's metrics: Acc@0.5 / mean IoU of the bbox head, heatmap pointing, and the printed report."""
from types import SimpleNamespace

import numpy as np
import pytest

from xvlm.box_ops import clip_xyxy
from xvlm.grounder import GroundingResult
from xvlm.evaluate import (box_size_by_target_size, eval_scenes, evaluate, format_report, ground_expressions,
                           grounding_accuracy, heatmap_points_into_box)


def test_pointing_is_true_only_when_the_hottest_cell_is_in_the_box():
    heat = np.zeros((12, 12))
    heat[3, 9] = 1.0                                   # cell centre at x = 9.5 * 20 = 190, y = 3.5 * 10 = 35
    r = GroundingResult("p", "p", (240, 120), patch_heatmap=heat)
    assert heatmap_points_into_box(r, (180, 30, 200, 40))
    assert heatmap_points_into_box(r, (195, 30, 220, 40))       # within half a cell of the edge
    assert not heatmap_points_into_box(r, (0, 0, 100, 100))


def test_pointing_on_a_letterboxed_grid_ignores_the_padding():
    heat = np.zeros((12, 12))
    heat[0, 0] = 5.0                                   # padding above the image
    heat[4, 9] = 1.0                                   # canvas (0, -60, 240, 180): centre x 190, y 4.5 * 20 - 60 = 30
    r = GroundingResult("p", "p", (240, 120), canvas_xyxy=(0.0, -60.0, 240.0, 180.0), patch_heatmap=heat)
    assert heatmap_points_into_box(r, (180, 25, 200, 35))
    assert not heatmap_points_into_box(r, (0, 0, 20, 20))


class _Oracle:
    """Answers each phrase with its target box (or a shifted one) and a heatmap hot at the box centre."""

    def __init__(self, scenes, shift: float, scale: float = 1.0):
        self.targets = {id(s.image): {p.text: p.box for p in s.refexps} for s in scenes}
        self.shift, self.scale = shift, scale

    def ground(self, image, phrases):
        W, H = image.size
        out = []
        for text in phrases:
            x0, y0, x1, y1 = self.targets[id(image)][text]
            heat = np.zeros((12, 12))
            heat[min(int((y0 + y1) / 2 / H * 12), 11), min(int((x0 + x1) / 2 / W * 12), 11)] = 1
            cx, cy = (x0 + x1) / 2 + self.shift * W, (y0 + y1) / 2
            hw, hh = (x1 - x0) / 2 * self.scale, (y1 - y0) / 2 * self.scale
            box = [cx - hw, cy - hh, cx + hw, cy + hh]
            out.append(GroundingResult(text, text, (W, H), box_xyxy=clip_xyxy(box, (W, H)), box_xyxy_unclipped=box,
                                       patch_heatmap=heat))
        return out


def test_metrics_are_one_for_exact_boxes_and_zero_for_far_ones():
    scenes = eval_scenes(6)
    exact = grounding_accuracy(ground_expressions(_Oracle(scenes, 0.0), scenes))
    n = sum(len(s.refexps) for s in scenes)
    assert exact["all"]["n"] == n > 0
    assert exact["all"]["acc@0.5"] == 1.0 and exact["all"]["mean_iou"] == pytest.approx(1.0)
    assert exact["all"]["pointing"] == 1.0 and exact["all"]["centre_in"] == 1.0
    far = grounding_accuracy(ground_expressions(_Oracle(scenes, 2.0), scenes))   # every box moved off the image
    assert far["all"]["acc@0.5"] == 0.0 and far["all"]["mean_iou"] == 0.0 and far["all"]["centre_in"] == 0.0
    too_big = grounding_accuracy(ground_expressions(_Oracle(scenes, 0.0, scale=1.6), scenes))   # IoU 1/1.6^2 < 0.5
    assert too_big["all"]["acc@0.5"] == 0.0 and too_big["all"]["centre_in"] == 1.0              # right object


def test_box_size_rows_read_the_width_ratio_of_boxes_on_the_right_object():
    scenes = eval_scenes(20)
    rows = box_size_by_target_size(ground_expressions(_Oracle(scenes, 0.0, scale=1.6), scenes))
    assert sum(r["n"] for r in rows) == sum(len(s.refexps) for s in scenes)
    filled = [r for r in rows if r["n"]]
    assert len(filled) >= 2 and all(r["median_width_ratio"] == pytest.approx(1.6) for r in filled)
    off = box_size_by_target_size(ground_expressions(_Oracle(scenes, 2.0), scenes))   # no box on its object
    assert all(r["median_width_ratio"] is None for r in off)


def test_eval_report_on_a_tiny_model(tmp_path, make_tiny_grounder):
    g = make_tiny_grounder(tmp_path)
    report = evaluate(g, n_scenes=4, n_retrieval=4)
    kinds = set(report["grounding"]) - {"all"}
    assert kinds and kinds <= {"attribute", "size", "position", "relation"}
    for row in report["grounding"].values():
        assert 0 <= row["acc@0.5"] <= 1 and 0 <= row["mean_iou"] <= 1 and 0 <= row["pointing"] <= 1
    for gran in ("image", "region", "object"):
        assert 0 <= report["retrieval"][gran]["r@1"] <= 1
    text = format_report(report)
    for heading in ("Acc@0.5", "centre in", "pointing", "box/target width", "R@1"):
        assert heading in text


def test_box_probe_reads_boxes_that_are_in_the_features(tmp_path, monkeypatch, make_tiny_grounder):
    """A vision encoder whose patch tokens are their own grid coordinates: the concept mean carries the box centre
    exactly, so the read-out must find it (R^2 ~ 1), while a constant encoder gives nothing to read."""
    import torch

    from xvlm.evaluate import box_probe_r2, object_concepts
    g = make_tiny_grounder(tmp_path)
    grid = g.grid_size
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([(cols.flatten() + 0.5) / grid, (rows.flatten() + 0.5) / grid], dim=1)
    width = g.model.cfg.vision.width

    def coordinate_tokens(images):
        patches = torch.zeros(len(images), grid * grid, width)
        patches[..., :2] = coords
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)

    monkeypatch.setattr(g.model, "encode_image", coordinate_tokens)
    scenes = eval_scenes(40)
    r2 = box_probe_r2(*object_concepts(g, scenes))
    assert r2["cx"] > 0.9 and r2["cy"] > 0.9 and r2["n_scored"] > 10
    g.cache.clear()
    monkeypatch.setattr(g.model, "encode_image", lambda images: torch.ones(len(images), 1 + grid * grid, width))
    flat = box_probe_r2(*object_concepts(g, scenes))
    assert flat["cx"] < 0.1 and flat["w"] < 0.1


def test_shape_probe_reads_shapes_that_are_in_the_features():
    """Concepts that are their object's one-hot shape (plus noise) are read back; constant ones give only the
    majority class."""
    import torch

    from xvlm.data.synthetic import SHAPES
    from xvlm.evaluate import object_concepts, shape_probe_accuracy
    scenes = eval_scenes(60)
    shapes_by_box = {(id(s.image), tuple(p.box)): s.objects[p.target[0]].shape for s in scenes for p in s.objects_text}
    generator = torch.Generator().manual_seed(0)

    class Knows:
        def concepts(self, image, boxes):
            onehot = torch.eye(8)[[SHAPES.index(shapes_by_box[id(image), tuple(b)]) for b in boxes]]
            return onehot + 0.1 * torch.randn(len(boxes), 8, generator=generator)

    class Blind:
        def concepts(self, image, boxes):
            return torch.ones(len(boxes), 8)

    seeing = shape_probe_accuracy(*object_concepts(Knows(), scenes))
    assert seeing["accuracy"] > 0.95 and seeing["n_scored"] > 20
    blind = shape_probe_accuracy(*object_concepts(Blind(), scenes))
    assert blind["accuracy"] == pytest.approx(blind["majority"]) and blind["majority"] < 0.6


def test_accuracy_by_the_words_that_name_the_target():
    scenes = eval_scenes(30)
    records = ground_expressions(_Oracle(scenes, 0.0), scenes)
    table = grounding_accuracy(records, by="named_by")
    assert sum(row["n"] for row in table.values()) == len(records)
    assert {"colour", "shape", "colour + shape"} <= set(table)
    assert all(set(words.split(" + ")) <= {"size", "colour", "shape"} or words == "noun only" for words in table)
    attribute = [r for r in records if r["kind"] == "attribute"]
    assert {r["named_by"] for r in attribute} >= {"colour", "shape"}   # "the red shape", "the triangle"
    assert "target named by" in format_report({**evaluate_stub(), "named_by": table})
    by_shape = grounding_accuracy(records, by="shape_without_colour")
    assert set(by_shape) <= {"circle", "square", "triangle", "rectangle"} and by_shape
    assert sum(row["n"] for row in by_shape.values()) == sum(
        r["named_by"] in ("shape", "size + shape") for r in records)
    assert "named by shape, no colour" in format_report({**evaluate_stub(), "shape_without_colour": by_shape})


class _Neighbour(_Oracle):
    """Answers each phrase with the exact box of the scene's first object that is not its target."""

    def __init__(self, scenes):
        super().__init__(scenes, 0.0)
        for scene in scenes:
            for p in scene.refexps:
                others = [o.box for o in scene.objects if tuple(o.box) != tuple(p.box)]
                self.targets[id(scene.image)][p.text] = others[0] if others else (-9, -9, -8, -8)


def test_shape_confusion_counts_the_object_under_the_box_centre():
    from xvlm.evaluate import shape_confusion
    scenes = eval_scenes(40)
    right = shape_confusion(ground_expressions(_Oracle(scenes, 0.0), scenes))
    assert right and all(row["target"] == sum(row.values()) > 0 for row in right.values())
    records = ground_expressions(_Neighbour(scenes), scenes)
    wrong = shape_confusion(records)
    by_shape = grounding_accuracy(records, by="shape_without_colour")
    for shape, row in wrong.items():
        assert row["target"] == 0 and sum(row.values()) == by_shape[shape]["n"]
        expected = [r["landed_on"] for r in records if r["shape_without_colour"] == shape]
        assert all(row[c] == expected.count(c) for c in row)
    assert sum(row["none"] for row in wrong.values()) < sum(sum(row.values()) for row in wrong.values())
    assert "box landed on" in format_report({**evaluate_stub(), "shape_confusion": wrong})


def test_accuracy_by_image_aspect_ratio():
    from xvlm.evaluate import aspect_bin
    assert [aspect_bin(s) for s in ((100, 100), (140, 100), (100, 199), (300, 100))] == [
        "1.0-1.2", "1.2-1.5", "1.5-2.0", "1.5-2.0"]
    scenes = eval_scenes(30)
    records = ground_expressions(_Oracle(scenes, 0.0), scenes)
    table = grounding_accuracy(records, by="aspect")
    assert len(table) >= 2 and sum(row["n"] for row in table.values()) == len(records)
    assert "image long/short side" in format_report({**evaluate_stub(), "aspect": table})


def evaluate_stub() -> dict:
    return {"model": "m", "scenes": 0, "seed": 0, "grounding": {}, "retrieval": {}}


def test_itm_metric_counts_present_and_absent_labels():
    scenes = eval_scenes(8)

    class Judge:
        """An ITM that is right: probability 0.9 for labels whose colour and shape the scene holds."""
        itm_model = object()

        meaning = {p.text: (s.objects[p.target[0]].color, s.objects[p.target[0]].shape)
                   for s in scenes for p in s.objects_text}

        def ground(self, image, phrases):
            scene = next(s for s in scenes if s.image is image)
            held = {(o.color, o.shape) for o in scene.objects}
            return [SimpleNamespace(itm=0.9 if self.meaning[p] in held else 0.1) for p in phrases]

    from xvlm.evaluate import itm_present_absent
    right = itm_present_absent(Judge(), scenes)
    assert right["n"] > 0 and right["accuracy"] == 1.0 and right["ranking"] == 1.0

    class Contrary(Judge):
        def ground(self, image, phrases):
            return [SimpleNamespace(itm=1 - r.itm) for r in super().ground(image, phrases)]

    wrong = itm_present_absent(Contrary(), scenes)
    assert wrong["accuracy"] == 0.0 and wrong["ranking"] == 0.0


def test_image_retrieval_misses_are_split_by_whether_the_colours_differ():
    from xvlm.evaluate import same_colour_misses

    def scene(*colours):
        return SimpleNamespace(objects=[SimpleNamespace(color=c) for c in colours])

    scenes = [scene("red", "blue"), scene("blue", "red", "red"), scene("red", "green"), scene("gray")]
    # scene 0 retrieved scene 1 (same colours), scene 2 retrieved scene 0 (not), scenes 1 and 3 themselves
    assert same_colour_misses(scenes, [1, 1, 0, 3], [False, True, False, True]) == (2, 1)
    assert same_colour_misses(scenes, [0, 1, 2, 3], [True] * 4) == (0, 0)
