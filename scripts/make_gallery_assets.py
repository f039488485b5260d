"""Write the app's example search gallery to assets/gallery/ (python scripts/make_gallery_assets.py).

Ten scenes from the corpus' 'eval' renderer with seeds far from any training seed (and from scripts/make_assets.py's),
plus captions.json (each scene's caption and object labels: queries to try, not used by the search).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xvlm.data.synthetic import generate_scene

GALLERY = Path(__file__).resolve().parent.parent / "assets" / "gallery"
SEEDS = tuple(920_001 + i for i in range(10))


def main() -> None:
    GALLERY.mkdir(parents=True, exist_ok=True)
    captions = []
    for i, seed in enumerate(SEEDS, start=1):
        scene = generate_scene(np.random.default_rng(seed), style="eval", min_objects=2, max_objects=5)
        name = f"scene_{i:02d}.png"
        scene.image.save(GALLERY / name, optimize=True)
        captions.append({"image": name, "caption": scene.caption, "objects": [p.text for p in scene.objects_text],
                         "source": f"corpus eval renderer, seed {seed}"})
    (GALLERY / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")


if __name__ == "__main__":
    main()
