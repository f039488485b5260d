"""Write the demo's example images and phrases to assets/ (python scripts/make_assets.py).

Six scenes come from the corpus' 'eval' renderer with seeds far from any training seed; two are drawn here with
OpenCV — another rasteriser, other backgrounds — so the gallery also shows images no training code path produced.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from xvlm.data.synthetic import generate_scene

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EVAL_SEEDS = (910_001, 910_002, 910_003, 910_005, 910_008, 910_013)


def corpus_examples() -> list[dict]:
    out = []
    for i, seed in enumerate(EVAL_SEEDS, start=1):
        scene = generate_scene(np.random.default_rng(seed), style="eval", min_objects=3, max_objects=6)
        name = f"shapes_{i:02d}.png"
        scene.image.save(ASSETS / name)
        kinds_seen, phrases = set(), []
        for p in scene.refexps:             # one expression of each kind first, then the rest
            if p.kind not in kinds_seen:
                kinds_seen.add(p.kind)
                phrases.append(p.text)
        phrases += [p.text for p in scene.refexps if p.text not in phrases]
        out.append({"image": name, "phrases": phrases[:4], "source": f"corpus eval renderer, seed {seed}"})
    return out


def opencv_examples() -> list[dict]:
    """Hand-placed scenes drawn with OpenCV on textured backgrounds."""
    rng = np.random.default_rng(7)
    canvas = np.full((360, 540, 3), (236, 230, 214), np.uint8)
    canvas = np.clip(canvas + rng.normal(0, 6, canvas.shape), 0, 255).astype(np.uint8)
    cv2.circle(canvas, (110, 190), 55, (220, 40, 40), -1, cv2.LINE_AA)
    cv2.rectangle(canvas, (250, 150), (330, 230), (40, 70, 210), -1, cv2.LINE_AA)
    cv2.circle(canvas, (450, 110), 28, (230, 200, 30), -1, cv2.LINE_AA)
    tri = np.array([[430, 300], [500, 300], [465, 240]], np.int32)
    cv2.fillPoly(canvas, [tri], (40, 160, 60), cv2.LINE_AA)
    Image.fromarray(canvas).save(ASSETS / "opencv_01.png")

    canvas = np.zeros((420, 300, 3), np.uint8)
    canvas[:] = np.linspace(250, 200, 420)[:, None, None].astype(np.uint8)
    cv2.rectangle(canvas, (40, 40), (140, 90), (150, 60, 170), -1)
    cv2.rectangle(canvas, (170, 60), (200, 90), (150, 60, 170), -1)
    cv2.circle(canvas, (90, 300), 60, (250, 140, 30), 8)
    cv2.circle(canvas, (230, 330), 30, (30, 30, 30), -1)
    Image.fromarray(canvas).save(ASSETS / "opencv_02.png")
    return [
        {"image": "opencv_01.png", "source": "drawn with OpenCV",
         "phrases": ["the red circle", "the blue square", "the yellow circle", "the green triangle"]},
        {"image": "opencv_02.png", "source": "drawn with OpenCV",
         "phrases": ["the large purple rectangle", "the small purple square", "the orange circle", "the black circle"]},
    ]


def main() -> None:
    ASSETS.mkdir(exist_ok=True)
    examples = corpus_examples() + opencv_examples()
    (ASSETS / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    print(f"wrote {len(examples)} examples to {ASSETS}")


if __name__ == "__main__":
    main()
