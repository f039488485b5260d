"""`python -m xvlm index` and `python -m xvlm search`: build a gallery index from a folder, search it by phrase.

    python -m xvlm index FOLDER --out INDEX [--batch-size 8] [model options]
        progress bar; resumable (files already in INDEX are skipped unread, progress is saved every --save-every
        images); unreadable files are skipped and listed; duplicates reported once. Under torchrun each rank encodes
        its share of the files into INDEX/shards/ and rank 0 merges them into INDEX.
    python -m xvlm search INDEX "phrase" [--k 10] [--rerank 16] [--json] [--out figure.png] [model options]
        ranked hits (ITC, ITM logit and probability, box); --out: a contact sheet of the hits with their boxes.
        Without model options, the model recorded in the index (when it was built by this command) is used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli import UsageError, _fail, _one_line, _user_errors
from .grounder import note_text


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (default: the shipped model in weights/; for search: the index's model)")
    src.add_argument("--model", metavar="DIR", help="a model folder saved by save_pretrained")
    src.add_argument("--checkpoint", metavar="CKPT", help="an official X-VLM checkpoint (.pth/.th)")
    src.add_argument("--config", metavar="YAML", help="the official task YAML of --checkpoint")
    src.add_argument("--preset", metavar="NAME", help="a built-in configuration for --checkpoint instead of --config")
    src.add_argument("--tokenizer", metavar="VOCAB", help="BERT vocab.txt (or its folder) for --checkpoint")
    src.add_argument("--scorer-checkpoint", metavar="CKPT", help="a second official checkpoint with ITC/ITM heads")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


MODEL_KEYS = ("model", "checkpoint", "config", "preset", "tokenizer", "scorer_checkpoint")


def _source(a: argparse.Namespace) -> dict:
    """How to load the model again (absolute paths), recorded in the index for `search`."""
    return {k: (str(Path(v).resolve()) if k != "preset" else v) for k in MODEL_KEYS
            if (v := getattr(a, k)) is not None}


def _grounder(a: argparse.Namespace):
    from .cli import _check_args, _load_grounder

    ns = argparse.Namespace(**{**vars(a), "out": None, "json": True, "heatmaps": False})
    _check_args(ns)
    return _load_grounder(ns)


# --- index -------------------------------------------------------------------------------------------------------
def index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvlm index", description="Index a folder of images for search.")
    p.add_argument("folder", help="folder of images (searched recursively: .png .jpg .jpeg .webp .bmp .gif .tif)")
    p.add_argument("--out", required=True, metavar="INDEX", help="index folder (created, or extended if it exists)")
    p.add_argument("--batch-size", type=int, default=8, help="images per vision pass")
    p.add_argument("--save-every", type=int, default=256, help="save progress every N new images (resume point)")
    _model_args(p)
    return p


def index_main(argv: list[str]) -> int:
    from . import index as gindex

    a = index_parser().parse_args(argv)
    try:
        files = gindex.list_images(a.folder)
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if not files:
            raise FileNotFoundError(f"no image files in {a.folder}")
        g = _grounder(a)
        if world > 1:
            idx = _sharded(g, files, a, rank, world)
            if idx is None:
                return 0
        else:
            idx = gindex.index_images(g, files, a.out, batch_size=a.batch_size, save_every=a.save_every,
                                      progress=True, root_for_ids=a.folder, source=_source(a))
        for line in idx.report.lines():
            print(line, file=sys.stderr)
        print(f"index {a.out}: {len(idx)} images, model {idx.model['name']}", file=sys.stderr)
    except _user_errors() as e:
        return _fail(_one_line(e))
    except RuntimeError as e:       # a model without ITC / ITM heads
        return _fail(_one_line(e))
    return 0


def _sharded(g, files, a, rank: int, world: int):
    """Each rank writes its shard; after a barrier rank 0 merges them (gloo: CPU processes or hosts)."""
    import torch.distributed as dist

    from . import index as gindex

    dist.init_process_group("gloo")
    try:
        report = gindex.write_shard(g, files, a.out, rank, world, batch_size=a.batch_size, progress=True,
                                    root_for_ids=a.folder, source=_source(a))
        for line in report.lines()[1:]:
            print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)
        dist.barrier()
        idx = gindex.merge_shards(g, a.out, source=_source(a)) if rank == 0 else None
        dist.barrier()
        return idx
    finally:
        dist.destroy_process_group()


# --- search ------------------------------------------------------------------------------------------------------
def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvlm search", description="Search a gallery index by phrase.")
    p.add_argument("index", help="index folder built by `python -m xvlm index`")
    p.add_argument("phrase", help="what to look for, e.g. 'a red circle left of a square'")
    p.add_argument("--k", type=int, default=10, help="hits to return (default 10)")
    p.add_argument("--rerank", type=int, default=None,
                   help="ITC candidates re-ranked by the ITM logit (the official k_test; clamped to the gallery); "
                        "default: the model's search_rerank (16; the shipped shapes model 0, see its card)")
    p.add_argument("--json", action="store_true", help="one JSON object per hit and line")
    p.add_argument("--out", metavar="FIGURE", help="save a contact sheet of the hits with their boxes (.png, .pdf)")
    _model_args(p)
    return p


def _search_grounder(a, idx):
    if any(getattr(a, k) is not None for k in MODEL_KEYS):
        return _grounder(a)
    src = idx.model.get("source") or {}
    return _grounder(argparse.Namespace(**{**vars(a), **{k: src.get(k) for k in MODEL_KEYS}}))


def search_main(argv: list[str]) -> int:
    from . import index as gindex
    from .preprocess import check_phrase

    a = search_parser().parse_args(argv)
    try:
        if a.k < 1 or (a.rerank is not None and a.rerank < 0):
            raise UsageError("--k must be >= 1 and --rerank >= 0")
        if a.out is not None:
            from matplotlib.backend_bases import FigureCanvasBase

            ext = Path(a.out).suffix.lower().lstrip(".")
            if ext not in FigureCanvasBase.get_supported_filetypes():
                raise UsageError(f"--out {a.out}: unsupported figure format {ext!r}; use .png, .pdf, .svg or .jpg")
        phrase = check_phrase(a.phrase)
        idx = gindex.GalleryIndex.load(a.index)
        g = _search_grounder(a, idx)
        hits = g.search(idx, phrase, k=a.k, rerank=a.rerank)
        if a.json:
            for h in hits:
                print(json.dumps(h.to_dict()), flush=True)
        else:
            sys.stdout.write(format_hits(hits, phrase, idx))
        if a.out is not None:
            from .render import save_figure

            path = save_figure(contact_sheet(hits, phrase), a.out)
            print(f"contact sheet saved to {path}", file=sys.stderr)
    except _user_errors() as e:
        return _fail(_one_line(e))
    except RuntimeError as e:
        return _fail(_one_line(e))
    except OSError as e:
        return _fail(_one_line(e), 1)
    return 0


def _f(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_hits(hits, phrase: str, idx) -> str:
    lines = [f"{phrase!r} in {idx.root} ({len(idx)} images, model {idx.model['name']})", "",
             f"{'rank':>4}  {'ITM logit':>9}  {'ITM':>6}  {'ITC':>6}  {'box (px)':<26}  image"]
    for h in hits:
        box = "-" if h.box_xyxy is None else "{:.0f},{:.0f},{:.0f},{:.0f}".format(*h.box_xyxy)
        lines.append(f"{h.rank:>4}  {_f(h.itm_logit):>9}  {_f(h.itm):>6}  {_f(h.itc):>6}  {box:<26}  {h.id}")
    if not idx.searcher.exact:
        lines.insert(1, f"ITC stage: approximate search ({idx.searcher.kind}), recall@10 against exact search "
                        f"{idx.ann_recall():.3f} on 100 queries near indexed images")
    notes = {note_text(k, v) for h in hits for k, v in h.notes.items()}
    lines += [""] + [f"note: {n}" for n in sorted(notes)] if notes else []
    lines += ["", "ranked by the ITM match logit (hits past --rerank by ITC, ITM logit '-'), as X-VLM's retrieval "
                  "evaluation; ITM: the match probability shown by the grounding view"]
    return "\n".join(lines) + "\n"


def hit_image(hit):
    """The hit's image with its box drawn (RGB array), for contact sheets and the app's gallery."""
    import numpy as np

    from .preprocess import load_image
    from .render import draw_boxes

    im = load_image(hit.path)
    return draw_boxes(im, [hit.grounding], show_labels=False) if hit.grounding is not None else np.asarray(im)


def contact_sheet(hits, phrase: str, columns: int = 5):
    """A grid of the hits with their boxes; title per hit: rank, id, ITM logit / probability, ITC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(hits), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, h in zip(axes.flat, hits):
        ax.imshow(hit_image(h))
        ax.set_title(f"#{h.rank} {Path(h.id).name[:24]}\nITM {_f(h.itm_logit, '.2f')} (p {_f(h.itm, '.2f')})  "
                     f"ITC {_f(h.itc, '.2f')}", fontsize=8)
    fig.suptitle(f"search: {phrase!r}", fontsize=11)
    fig.tight_layout()
    return fig


__all__ = ["index_main", "search_main", "contact_sheet", "format_hits", "hit_image"]
