"""Write the demo's example images and phrases to assets/ (python scripts/make_assets.py).

The examples are drawn by a fixed rule, not chosen (issue #26): the first `N_EACH` seeds of two fixed ranges, one
scene per seed, whatever the model makes of them.
* `shapes_NN.png`: the corpus' held-out 'eval' style, seeds EVAL_FIRST_SEED, EVAL_FIRST_SEED + 1, ... (far from the
  training seeds and from the eval command's);
* `cross_NN.png`: the independent OpenCV renderer of the cross-renderer eval (`xvlm.crossrender`), scenes
  default_rng([CROSS_EXAMPLE_SEED, i]) for i = 0, 1, ... (another seed than the eval's 300 scenes).
Phrases, by rule too: the scene's referring expressions in generation order, the first of each kind first, then the
rest, at most four.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # run as a script from anywhere
from xvlm.crossrender import cross_scene  # noqa: E402
from xvlm.data.synthetic import generate_scene  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
N_EACH = 4
EVAL_FIRST_SEED = 910_001
CROSS_EXAMPLE_SEED = 920_001
PHRASES_PER_EXAMPLE = 4
PREFIXES = ("shapes_", "cross_", "opencv_")      # files this script owns (old ones are removed)


def pick_phrases(refexps) -> list[str]:
    kinds_seen, phrases = set(), []
    for p in refexps:                       # one expression of each kind first, then the rest
        if p.kind not in kinds_seen:
            kinds_seen.add(p.kind)
            phrases.append(p.text)
    phrases += [p.text for p in refexps if p.text not in phrases]
    return phrases[:PHRASES_PER_EXAMPLE]


def examples() -> list[tuple[str, object, list[str], str]]:
    """(file name, PIL image, phrases, source) of every example, in gallery order."""
    out = []
    for i in range(N_EACH):
        seed = EVAL_FIRST_SEED + i
        scene = generate_scene(np.random.default_rng(seed), style="eval", min_objects=3, max_objects=6)
        out.append((f"shapes_{i + 1:02d}.png", scene.image, pick_phrases(scene.refexps),
                    f"corpus eval style, seed {seed} (seeds {EVAL_FIRST_SEED}..{EVAL_FIRST_SEED + N_EACH - 1}, "
                    "not picked)"))
    for i in range(N_EACH):
        scene = cross_scene(np.random.default_rng([CROSS_EXAMPLE_SEED, i]))
        out.append((f"cross_{i + 1:02d}.png", scene.image, pick_phrases(scene.refexps),
                    f"independent OpenCV renderer (xvlm.crossrender), scene [{CROSS_EXAMPLE_SEED}, {i}] "
                    f"(the first {N_EACH}, not picked)"))
    return out


def main(assets: Path = ASSETS) -> None:
    assets.mkdir(exist_ok=True)
    for old in assets.iterdir():
        if old.suffix == ".png" and old.name.startswith(PREFIXES):
            old.unlink()
    entries = []
    for name, image, phrases, source in examples():
        image.save(assets / name)
        entries.append({"image": name, "phrases": phrases, "source": source})
    (assets / "examples.json").write_text(json.dumps(entries, indent=2) + "\n")
    print(f"wrote {len(entries)} examples to {assets}")


if __name__ == "__main__":
    main()
