"""Training samples -> batches of (visual concept, text) pairs, and the stream of a run's batches.

Nothing here knows a corpus: concepts arrive with their kind, whether they are box targets, and a query/referent
pair that says which texts describe which objects (xvlm.data.adapters).
"""
from __future__ import annotations

import hashlib
import os
import random

import torch

from ..box_ops import xyxy_to_cxcywh
from ..config import XVLMConfig
from ..data.adapters import Concept, TrainingSample
from ..models import box_patch_mask
from ..preprocess import Canvas, Tokenizer, image_to_tensor
from .recipes import Recipe, Stage


def text_id(text: str) -> int:
    """A process-independent id: pairs with the same text are positives for each other in ITC."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def distinct_concepts(concepts: list[Concept], stage: Stage, rng: random.Random) -> list[Concept]:
    """Up to `phrases_per_image` of the concepts the stage takes, with pairwise different boxes. Two texts for one box
    ("small red circle", "the red circle") in one batch would be each other's false negatives in ITC and, worse, the
    hardest negatives ITM mines: contradictory labels that hold ITM at chance."""
    pool = [c for c in concepts if stage.takes(c.kind)]
    chosen, boxes = [], set()
    for c in rng.sample(pool, len(pool)):
        box = tuple(round(v, 1) for v in c.box)
        if box not in boxes:
            chosen.append(c)
            boxes.add(box)
        if len(chosen) == stage.phrases_per_image:
            break
    return chosen


def absent_texts(sample: TrainingSample, k: int, rng: random.Random) -> list[str]:
    """Up to k texts naming what the sample's image lacks: the kinds taken in turn (the one missing shape is not
    drowned by thirty missing colour + shape pairs), each absent thing once, in one of its wordings."""
    pools = [rng.sample(groups, len(groups)) for groups in sample.absent.values() if groups]
    out: list[str] = []
    while len(out) < k and any(pools):
        for pool in pools:
            if pool and len(out) < k:
                out.append(rng.choice(pool.pop()))
    return out


def collate(samples: list[TrainingSample], tokenizer: Tokenizer, cfg: XVLMConfig, stage: Stage,
            rng: random.Random) -> dict:
    """Samples -> one batch of pairs. Pair j: visual = image group[j] masked by patch_mask[j]; text = ids[j]; a
    caption's pair is its whole image."""
    res, grid, resize = cfg.vision.image_res, cfg.vision.grid_size, cfg.vision.resize
    images, texts, group, boxes, is_image, queries, referents, box_target = [], [], [], [], [], [], [], []
    for i, s in enumerate(samples):
        image = s.load(cfg.vision.convert)           # the safe loader, read the way the model reads uploads
        images.append(image_to_tensor(image, res, resize))
        canvas = Canvas.of(image.size, res, resize)
        if s.caption:
            texts.append(s.caption), group.append(i), boxes.append((0.0, 0.0, 1.0, 1.0)), is_image.append(True)
            queries.append(None), referents.append(None), box_target.append(True)
        for c in distinct_concepts(s.concepts, stage, rng):
            texts.append(c.text), group.append(i), is_image.append(False)
            boxes.append(tuple(canvas.normalise(c.box).clip(0.0, 1.0)))
            queries.append(c.query), referents.append(c.referent), box_target.append(c.box_target)
    describes = torch.tensor([[q is not None and o is not None and q.matches(o) for o in referents] for q in queries],
                             dtype=torch.bool).reshape(len(texts), len(texts))
    # text j could be about something in image i (own image; unknown meaning: any image): never an image negative
    describes_image = torch.tensor(
        [[g == i or q is None or not samples[i].contents or any(q.matches(o) for o in samples[i].contents)
          for i in range(len(samples))] for q, g in zip(queries, group)], dtype=torch.bool).reshape(len(texts), -1)
    absent = [(text, i) for i, s in enumerate(samples) for text in absent_texts(s, stage.absent_per_image, rng)
              ] if stage.absent_per_image else []
    tok = tokenizer(texts)
    xyxy = torch.tensor(boxes, dtype=torch.float32)
    patch_mask = box_patch_mask(xyxy, grid)
    patch_mask[torch.tensor(is_image)] = 1.0
    return {"images": torch.stack(images), "group": torch.tensor(group), "patch_mask": patch_mask,
            "input_ids": tok.input_ids, "attention_mask": tok.attention_mask,
            "idx": torch.tensor([text_id(c) for c in tok.captions]), "is_image": torch.tensor(is_image),
            "boxes": xyxy_to_cxcywh(xyxy), "describes": describes, "describes_image": describes_image,
            "names_one_object": torch.tensor(box_target), **absent_batch(absent, tokenizer)}


def absent_batch(absent: list[tuple[str, int]], tokenizer: Tokenizer) -> dict:
    """The batch's absent texts, tokenised, and the image each one is a negative for; no keys when there are none."""
    if not absent:
        return {}
    tok = tokenizer([text for text, _ in absent])
    return {"absent_ids": tok.input_ids, "absent_mask": tok.attention_mask,
            "absent_group": torch.tensor([i for _, i in absent])}


class StepBatches(torch.utils.data.Dataset):
    """Batch of global step s = collate(source.batch(s)) with that step's stage and rng: a pure function of s, so
    loader workers can build the next batches while the model trains on this one and the run stays reproducible and
    resumable. Building a batch is a small part of a CPU step (the cores are busy with the model anyway) but most
    of a GPU step."""

    def __init__(self, source, recipe: Recipe, rank: int, tokenizer: Tokenizer, cfg: XVLMConfig):
        self.source, self.recipe, self.rank, self.tokenizer, self.cfg = source, recipe, rank, tokenizer, cfg
        self.stage_of_step = [stage for stage in recipe.stages for _ in range(stage.steps)]

    def __len__(self) -> int:
        return len(self.stage_of_step)

    def __getitem__(self, step: int) -> dict:
        rng = random.Random(hash((self.recipe.seed, self.rank, step)))
        return collate(self.source.batch(step, self.rank, self.recipe.batch_images), self.tokenizer, self.cfg,
                       self.stage_of_step[step], rng)


def step_batches(dataset: StepBatches, start: int, workers: int):
    """The batches of steps start, start+1, ... in order; `workers` > 0 builds them ahead in that many processes."""
    if workers == 0:
        return (dataset[step] for step in range(start, len(dataset)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # the tokenizer is used before the fork
    return iter(torch.utils.data.DataLoader(dataset, sampler=range(start, len(dataset)), batch_size=None,
                                            num_workers=workers, prefetch_factor=2, persistent_workers=False))


def align_probe_batch(source, recipe: Recipe, stage_index: int, rank: int, tokenizer: Tokenizer,
                      cfg: XVLMConfig) -> dict:
    """The batch `align_cross_attention` calibrates on: a pure function of (seed, stage, rank), like every training
    batch (a str seed, because `hash()` of a str differs between processes and would make the run irreproducible)."""
    rng = random.Random(f"align|{recipe.seed}|{stage_index}")
    return collate(source.batch(10**9 + stage_index, rank, recipe.batch_images), tokenizer, cfg,
                   recipe.stages[stage_index], rng)
