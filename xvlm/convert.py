"""`python -m xvlm convert`: an official X-VLM checkpoint -> our format (one model per folder).

    python -m xvlm convert CKPT (--preset NAME | --config YAML) --tokenizer VOCAB --out DIR [--overwrite]

writes DIR/model.safetensors, config.json, vocab.txt and README.md (a model-card stub naming the source file and its
sha256). The checkpoint is read with `torch.load(weights_only=True)` and loaded strictly (xvlm.checkpoint), so the
folder holds exactly the weights `Grounder.from_official` would use: `Grounder.from_pretrained(DIR)` gives the same
outputs. A box-only checkpoint and its scorer are converted into two folders and paired when loading:
`Grounder.from_pretrained(BOX_DIR, scorer=SCORER_DIR)`.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from tqdm import tqdm

CARD_NAME = "README.md"


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    path = Path(path)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                     disable=path.stat().st_size < 64 << 20, leave=False) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def model_card(source: Path, digest: str, shape: str, heads: tuple[str, ...], params: int) -> str:
    return f"""---
library_name: xvlm-grounding
tags: [x-vlm, visual-grounding, image-text-matching]
---

# X-VLM, converted from `{source.name}`

- source file: `{source.name}`
- source sha256: `{digest}`
- configuration: {shape}
- heads: {", ".join(heads)}
- parameters: {params:,}

Converted with `python -m xvlm convert` (xvlm-grounding). The weights are the official checkpoint's, renamed to this
project's layout and loaded strictly: `Grounder.from_pretrained` on this folder gives the outputs of
`Grounder.from_official` on the source file. Model: X-VLM, Zeng et al., "Multi-Grained Vision Language
Pre-Training: Aligning Texts with Visual Concepts", ICML 2022 (https://github.com/zengyan-97/X-VLM); see there for
the checkpoint's training data and licence.

TODO for the uploader: the task this checkpoint was fine-tuned for, its evaluation numbers, its licence.
"""


def convert(checkpoint: str | Path, out: str | Path, tokenizer: str | Path, config: str | Path | None = None,
            preset: str | None = None, overwrite: bool = False) -> Path:
    """Convert one official checkpoint into `out`; returns the folder. Nothing is written when loading fails."""
    from .checkpoint import CONFIG_NAME, load_official, save_pretrained
    from .grounder import _official_config
    from .preprocess import Tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    cfg = _official_config(config, preset)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a model (config.json); pass --overwrite to replace it")
    tok = Tokenizer(tokenizer, max_tokens=cfg.max_tokens, max_words=cfg.max_words)
    if tok.vocab_size != cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model expects {cfg.text.vocab_size}")
    model = load_official(checkpoint, cfg)
    digest = sha256(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out, vocab=tok.vocab_file)
    shape = f"preset `{preset}`" if preset is not None else f"official task YAML `{Path(config).name}`"
    params = sum(p.numel() for p in model.parameters())
    (out / CARD_NAME).write_text(model_card(checkpoint, digest, shape, model.heads, params))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvlm convert",
                                description="Convert an official X-VLM checkpoint into a model folder "
                                            "(model.safetensors, config.json, vocab.txt, README.md).")
    p.add_argument("checkpoint", metavar="CKPT", help="official checkpoint (.pth/.th)")
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--preset", metavar="NAME", help="a built-in configuration (xvlm-base-4m, ...)")
    shape.add_argument("--config", metavar="YAML", help="the checkpoint's official task YAML")
    p.add_argument("--tokenizer", metavar="VOCAB", required=True, help="bert-base-uncased vocab.txt or its folder")
    p.add_argument("--out", metavar="DIR", required=True, help="the model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    a = parser().parse_args(argv)
    try:
        out = convert(a.checkpoint, a.out, a.tokenizer, config=a.config, preset=a.preset, overwrite=a.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}/ (model.safetensors, config.json, vocab.txt, README.md)", file=sys.stderr)
    return 0


__all__ = ["convert", "main", "sha256", "model_card"]
