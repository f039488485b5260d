"""Where a run's samples come from. A source's batch of (step, rank) is a pure function of its seed, so a run is
reproducible and resumable; sources yield `TrainingSample`s (xvlm.data.adapters): the data side decides meanings."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..config import XVLMConfig
from ..data.adapters import TrainingSample, training_sample
from ..preprocess import Tokenizer, write_wordpiece_vocab


class SyntheticSource:
    """Scenes drawn from the procedural corpus; scene i of step s of rank r is a pure function of its seed."""

    def __init__(self, seed: int, style: str = "train"):
        from ..data.official import scene_to_sample
        from ..data.synthetic import VOCAB_WORDS, generate_scene
        self.seed, self.style, self._generate, self._to_sample = seed, style, generate_scene, scene_to_sample
        self.words: tuple[str, ...] | None = tuple(VOCAB_WORDS)   # a closed corpus: the model knows these words only

    def batch(self, step: int, rank: int, n: int) -> list[TrainingSample]:
        return [training_sample(self._to_sample(self._generate(np.random.default_rng([self.seed, rank, step, i]),
                                                                style=self.style)))
                for i in range(n)]


class ListSource:
    """User data in the official JSON formats (see xvlm.data.official), sampled with replacement."""

    words = None                                                   # an open vocabulary

    def __init__(self, samples, seed: int):
        if not samples:
            raise ValueError("no training samples")
        self.samples, self.seed = [training_sample(s) for s in samples], seed

    def batch(self, step: int, rank: int, n: int) -> list[TrainingSample]:
        rng = random.Random(hash((self.seed, rank, step)))
        return [self.samples[rng.randrange(len(self.samples))] for _ in range(n)]


def make_tokenizer(out: Path, cfg: XVLMConfig, vocab: str | None) -> Tokenizer:
    """The run's tokenizer, its vocabulary written to out/vocab.txt: `vocab`'s, or the synthetic corpus' words."""
    if vocab is None:
        from ..data.synthetic import VOCAB_WORDS
        vocab_path = write_wordpiece_vocab(VOCAB_WORDS, out / "vocab.txt")
    else:
        vocab_path = out / "vocab.txt"
        vocab_path.write_text(Path(vocab).read_text())
    return Tokenizer(vocab_path, max_tokens=cfg.max_tokens, max_words=cfg.max_words)
