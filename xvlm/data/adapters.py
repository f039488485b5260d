"""Samples -> training samples: each phrase becomes a `Concept` whose meaning is decided here, on the data side.

Batch building (xvlm.training.collate) knows no corpus: it reads a concept's text, box and kind, whether its box is a
consistent box target, and, to keep texts that describe each other's objects from being ITC/ITM negatives, asks a
concept's `query` whether it `matches` another concept's `referent` or an object of another image (`contents`).
For the synthetic corpus a query is a `Desc` (what the text says: colour, shape, size) and referents and contents
are `SceneObject`s; official-format data knows neither, and its texts are never each other's negatives that way.
A training sample also says what its image does *not* hold (`absent`: texts, by kind, that describe none of its
objects), where the data side knows: the same-image ITM negatives of stages that ask for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from .official import Sample
from .synthetic import Desc, Phrase, SceneObject, absent_descs, plain_names

Box = tuple[float, float, float, float]


class Query(Protocol):
    def matches(self, obj: Any) -> bool: ...


@dataclass(frozen=True)
class Concept:
    """One (visual concept, text) pair: a text and the xyxy pixel box of what it names in its sample's image."""
    text: str
    box: Box
    kind: str                     # which stages may take it (`Stage.phrase_kinds`)
    query: Query | None = None    # what the text asks of an object; None where unknown
    referent: Any = None          # the one object its box holds; None where several or unknown
    box_target: bool = True       # the text names this one object and no other of the image: a consistent target


@dataclass
class TrainingSample:
    """What a training batch is built from: the image (read through its `Sample`), a caption or None, concepts, and
    the objects the image holds (`contents`, what queries match; empty where unknown) and what it does not hold
    (`absent`: kind -> one tuple of alternative wordings per absent thing; empty where unknown)."""
    sample: Sample
    caption: str | None
    concepts: list[Concept]
    contents: list
    absent: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)

    def load(self, convert: str = "official") -> Image.Image:
        return self.sample.load(convert)

    @property
    def image(self) -> Image.Image:
        return self.sample.image


def training_sample(sample: Sample | TrainingSample) -> TrainingSample:
    """A sample's phrases as concepts, with what each one means for training (see the module docstring)."""
    if isinstance(sample, TrainingSample):
        return sample
    concepts = []
    for p in sample.phrases:
        query, referent = _meaning(p, sample.objects)
        concepts.append(Concept(p.text, p.box, p.kind, query, referent, _names_one_object(p, query, sample.objects)))
    absent = {kind: [tuple(plain_names(d)) for d in descs] for kind, descs in absent_descs(sample.objects).items()
              } if sample.objects else {}
    return TrainingSample(sample, sample.caption, concepts, list(sample.objects), absent)


def _names_one_object(phrase: Phrase, want: Desc | None, objects: list[SceneObject]) -> bool:
    """False for an object label whose description (colour and shape) fits another object of the scene too ("red
    circle" beside a second red circle): as a box target it contradicts itself (about a third of the labels of
    training scenes). Other kinds name one object (referring expressions) or one group (regions) by construction;
    unknown meaning: True."""
    if phrase.kind != "object" or want is None:
        return True
    return sum(want.matches(o) for o in objects) == 1


def _meaning(phrase: Phrase, objects: list[SceneObject]) -> tuple[Desc | None, SceneObject | None]:
    """(what the text asks of an object, the object its box holds) for single-object phrases of synthetic scenes;
    None where unknown (captions, regions, user data)."""
    if not objects or len(phrase.target) != 1:
        return None, None
    obj = objects[phrase.target[0]]
    if phrase.spec is not None:
        return phrase.spec.target, obj
    if phrase.kind == "object":   # "red circle" / "small red circle": colour and shape at least (size ignored)
        return Desc(color=obj.color, shape=obj.shape), obj
    return None, obj
