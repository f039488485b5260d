"""The "Search a gallery" tab: upload several images (or use the example gallery in assets/gallery/), type a phrase, see
the ranked hits with their boxes and ITC / ITM scores (X-VLM's retrieval protocol: ITC top-k, re-ranked by the ITM
logit); clicking a hit opens it in the grounding view above. API: `/search` (files, phrase, k) -> JSON hits.

Computing lives in `search_gallery` / `search_json` (testable without a server); `build_search_tab` only wires
components. Each gallery (a set of files, by content) is indexed once per model into a work folder and reused.
"""

import hashlib
import shutil
import tempfile
import threading
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from xvlm.grounder import Grounder, note_text
from xvlm.limits import MAX_GALLERY, MAX_HITS, MAX_RERANK
from xvlm.preprocess import InputError, check_phrase
from xvlm.retrieval import default_rerank

from .zerogpu import gpu

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_K = 6
THUMB_SIDE = 320
HEADERS = ["rank", "image", "ITM logit", "ITM", "ITC", "box (px)"]
NO_GALLERY = "No images: upload a few (or tick 'use the example gallery')."


def example_gallery(assets_dir: str | Path = ASSETS) -> list[Path]:
    return sorted((Path(assets_dir) / "gallery").glob("*.png"))


class GalleryIndexes:
    """(model, gallery contents) -> a built index in a work folder; the least recently used are deleted past
    `max_entries`. Thread-safe."""

    def __init__(self, workdir: str | Path | None = None, max_entries: int = 8):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="xvlm-galleries-"))
        self.max_entries = max_entries
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, g: Grounder, files: list[Path]):
        from xvlm import index as gindex

        h = hashlib.sha1(g.name.encode())
        for f in sorted(files, key=str):
            h.update(str(f).encode() + b"|" + Path(f).read_bytes())
        key = h.hexdigest()[:20]
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        root = self.workdir / key
        shutil.rmtree(root, ignore_errors=True)
        idx = gindex.index_images(g, files, root)
        with self._lock:
            self._items[key] = idx
            while len(self._items) > self.max_entries:
                old, _ = self._items.popitem(last=False)
                shutil.rmtree(self.workdir / old, ignore_errors=True)
        return idx


def _files(files, use_examples: bool, assets_dir) -> list[Path]:
    paths = [Path(f if isinstance(f, (str, Path)) else (f.get("path") if isinstance(f, dict) else f.name))
             for f in (files or [])]
    if not paths and use_examples:
        paths = example_gallery(assets_dir)
    if not paths:
        raise InputError(NO_GALLERY)
    if len(paths) > MAX_GALLERY:
        raise InputError(f"too many images ({len(paths)}); at most {MAX_GALLERY} per gallery")
    return paths


def _run(g, files, phrase, k, rerank, indexes, lock, use_examples, assets_dir):
    phrase = check_phrase(phrase if isinstance(phrase, str) else "")
    k = int(np.clip(int(k or DEFAULT_K), 1, MAX_HITS))
    paths = _files(files, use_examples, assets_dir)
    with lock or nullcontext():
        idx = indexes.get(g, paths)
        hits = g.search(idx, phrase, k=k, rerank=None if rerank is None else int(rerank))
    return phrase, idx, hits


def _fmt(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def search_gallery(g: Grounder, files, phrase, k=DEFAULT_K, rerank=None,
                   indexes: GalleryIndexes | None = None, lock=None, use_examples: bool = True, assets_dir=ASSETS):
    """-> (gallery items [(RGB array with the box, caption)], table rows, status markdown, hits as [(path, phrase)]).
    Never raises for user errors: they come back as the status message with empty outputs."""
    from xvlm.search_cli import hit_image
    from PIL import Image

    indexes = indexes or GalleryIndexes()
    try:
        phrase, idx, hits = _run(g, files, phrase, k, rerank, indexes, lock, use_examples, assets_dir)
    except (InputError, RuntimeError) as e:
        return [], [], f"⚠️ **{e}**", []
    items, rows = [], []
    for h in hits:
        im = Image.fromarray(hit_image(h))
        im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        items.append((np.asarray(im), f"#{h.rank} {Path(h.id).name} · ITM {_fmt(h.itm_logit, '.2f')} "
                                      f"(p {_fmt(h.itm, '.2f')}) · ITC {_fmt(h.itc, '.2f')}"))
        box = "–" if h.box_xyxy is None else ", ".join(f"{v:.0f}" for v in h.box_xyxy)
        rows.append([h.rank, Path(h.id).name, _fmt(h.itm_logit), _fmt(h.itm), _fmt(h.itc), box])
    notes = sorted({note_text(k, v) for h in hits for k, v in h.notes.items()})
    n_rerank = min(len(idx), default_rerank(g) if rerank is None else int(rerank))
    ranking = (f"ranked by the ITM match logit over the {n_rerank} best by ITC (X-VLM's retrieval protocol)"
               if n_rerank else "ranked by ITC (no ITM re-ranking: this model's default, see its card, or the slider "
               "at 0)")
    status = (f"**{len(hits)}** of {len(idx)} images for *{phrase}*: {ranking}. Click a hit to open it in the "
              "grounding view." + "".join(f"\n\nnote: {n}" for n in notes))
    skipped = idx.report.skipped + [(a, f"same pixels as {b}") for a, b in idx.report.duplicates]
    if skipped:
        status += "\n\nleft out: " + "; ".join(f"{Path(a).name} ({why})" for a, why in skipped[:5])
    return items, rows, status, [(h.path, phrase) for h in hits]


def search_json(g: Grounder, files, phrase, k=DEFAULT_K, rerank=None, indexes=None, lock=None,
                assets_dir=ASSETS) -> dict:
    """The API: hits as JSON (raises InputError with a readable message)."""
    phrase, idx, hits = _run(g, files, phrase, k, rerank, indexes or GalleryIndexes(), lock, True, assets_dir)
    return {"phrase": phrase, "model": g.name, "gallery_size": len(idx),
            "hits": [{**h.to_dict(), "path": None, "image": Path(h.id).name} for h in hits],
            "left_out": [{"file": Path(a).name, "reason": why} for a, why in idx.report.skipped]
                        + [{"file": Path(a).name, "reason": f"same pixels as {Path(b).name}"}
                           for a, b in idx.report.duplicates]}


def open_hit(hits, index: int):
    """A clicked hit -> (its image, its phrase) for the grounding view's inputs."""
    from xvlm.preprocess import load_image

    if not hits or index is None or not 0 <= index < len(hits):
        raise InputError("no such hit")
    path, phrase = hits[index]
    return load_image(path), phrase


def _default_rerank(registry) -> int:
    """Where the re-ranking slider starts: the default model's `search_rerank` (the config's default when that model
    cannot be loaded; the search itself then reports why)."""
    from xvlm.config import XVLMConfig

    from .models import ModelUnavailable

    try:
        return default_rerank(registry.get(registry.default))
    except ModelUnavailable:
        return XVLMConfig.__dataclass_fields__["search_rerank"].default


def build_search_tab(registry, image_in, phrases_in, ground_event: dict, assets_dir=ASSETS,
                     workdir: str | Path | None = None) -> None:
    """The tab's components and events, inside the caller's Blocks. A clicked hit fills the grounding view's
    `image_in` / `phrases_in` and runs `ground_event` (the kwargs of the page's own ground event)."""
    import gradio as gr

    from .models import ModelUnavailable

    indexes = GalleryIndexes(workdir)
    model_dd = ground_event["inputs"][0]

    @gpu   # ZeroGPU: the search encodes and grounds inside this call (app/zerogpu.py; a no-op without `spaces`)
    def do_search(model_name, files, use_examples, phrase, k, rerank):
        try:
            g = registry.get(model_name)
        except ModelUnavailable as e:
            return [], [], f"⚠️ **{e}**", []
        return search_gallery(g, files, phrase, k, rerank, indexes, registry.lock(model_name or registry.default),
                              use_examples, assets_dir)

    def on_select(hits, evt: gr.SelectData):
        try:
            return open_hit(hits, evt.index)
        except InputError as e:
            raise gr.Error(str(e)) from None

    @gpu
    def api_search(files, phrase, k):
        try:
            g = registry.get(registry.default)
            return search_json(g, files, phrase, k if k is not None else DEFAULT_K, None, indexes,
                               registry.lock(registry.default), assets_dir)
        except (InputError, ModelUnavailable, RuntimeError) as e:
            raise gr.Error(str(e)) from None

    with gr.Tab("Search a gallery", elem_id="search-tab"):
        gr.Markdown("Find the images of a gallery that a phrase describes, and where: ITC over every image, the best "
                    "candidates re-ranked by ITM (the match **logit**, as X-VLM's retrieval evaluation), and the "
                    "phrase's box in each hit.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                files = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                label=f"Gallery images (at most {MAX_GALLERY})", elem_id="search-files")
                use_examples = gr.Checkbox(True, label="use the example gallery when nothing is uploaded",
                                           elem_id="search-examples")
                phrase = gr.Textbox(label="Phrase", placeholder="a red circle and a blue square",
                                    elem_id="search-phrase")
                with gr.Row():
                    k = gr.Slider(1, MAX_HITS, value=DEFAULT_K, step=1, label="hits")
                    rerank = gr.Slider(0, MAX_RERANK, value=_default_rerank(registry), step=1,
                                       label="re-ranked by ITM (k_test; default: the model's)")
                search_btn = gr.Button("Search", variant="primary", elem_id="search-btn")
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="search-status")
                gallery = gr.Gallery(label="hits (click one to ground it above)", columns=3, height="auto",
                                     format="png", object_fit="contain", elem_id="search-gallery")
                table = gr.Dataframe(headers=HEADERS, interactive=False, label="ranked hits", elem_id="search-table")
        hits_state = gr.State([])
        ev = dict(fn=do_search, inputs=[model_dd, files, use_examples, phrase, k, rerank],
                  outputs=[gallery, table, status, hits_state], api_visibility="private", concurrency_id="ground")
        search_btn.click(**ev)
        phrase.submit(**ev)
        gallery.select(on_select, hits_state, [image_in, phrases_in], api_visibility="private").then(**ground_event)

        # the API: files (none: the example gallery) + phrase + k -> JSON hits, with the default model:
        #   gradio_client.Client(url).predict([handle_file(p) for p in paths], "a red circle", 5, api_name="/search")
        with gr.Row(visible=False):
            api_files = gr.File(file_count="multiple", type="filepath", label="images")
            api_phrase = gr.Textbox(label="phrase")
            api_k = gr.Number(DEFAULT_K, precision=0, label="k")
            api_out = gr.JSON(label="hits")
            api_btn = gr.Button("search")
        api_btn.click(api_search, [api_files, api_phrase, api_k], api_out, api_name="search",
                      api_description="Search images (none given: the example gallery) for a phrase: hits ranked by "
                                      "the ITM logit over the ITC top candidates, each with ITC, ITM and its box.")


__all__ = ["build_search_tab", "search_gallery", "search_json", "open_hit", "GalleryIndexes", "example_gallery"]
