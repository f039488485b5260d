"""The Gradio page. Thin: layout and wiring only; all computing is in `app/callbacks.py`.

Per-user state is the page's own component values (chosen model, phrases, controls); the only shared objects are the
model registry (read-only models, loaded lazily, one lock per model) and the grounders' encoding caches.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

# No usage analytics: Gradio reports to api.gradio.app from Blocks() and launch() unless this is "False" (some of its
# calls read only the variable, not the Blocks flag), and README promises that nothing goes out. Set before gradio is
# imported; `build_demo` also passes analytics_enabled=False. tests/test_app_network.py checks it.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from xvlm.limits import MAX_FILE_SIZE, MAX_PHRASES  # noqa: E402

from . import callbacks as cb  # noqa: E402
from .analysis_panel import HOW_TO_READ as ANALYSIS_HOW_TO_READ  # noqa: E402
from .analysis_panel import build_analysis_panel  # noqa: E402
from .guide import how_to_read  # noqa: E402
from .models import ModelRegistry, ModelUnavailable  # noqa: E402
from .search_tab import build_search_tab  # noqa: E402
from .zerogpu import gpu  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TITLE = "X-VLM visual grounding"
# scripts/make_assets.py draws them by a fixed rule; the model line above the image says how accurate it measured
EXAMPLES_LABEL = ("Examples (click one to ground it): the first seeds of the eval style and of an independent "
                  "renderer, not picked")

INTRO = """# X-VLM visual grounding
Type one phrase per line; each phrase gets a **box** (bbox head), a **patch-level ITC heatmap** (image / region /
objects granularity) and an **ITM Grad-CAM** map. Model: X-VLM, *Multi-Grained Vision Language Pre-Training*
(Zeng et al., ICML 2022)."""

LOADING = "*loading the model…*"

CSS = """
#status {min-height: 1.5em}
.note {font-size: 0.92em; opacity: 0.9}
"""


def theme() -> gr.themes.Base:
    """System fonts only: the page loads nothing from the internet."""
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does, which an explicit setting keeps precedence over).

    Gradio answers from a pool of threads and glibc gives each its own arena; decoded uploads freed in one arena are
    not reused by the others, so the server's RSS crept up by about 0.8 MiB per request in our load test (see
    benchmarks/RESULTS.md). Returns whether the cap was set (False off glibc)."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, arenas))        # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def launch_kwargs() -> dict:
    return {"max_file_size": MAX_FILE_SIZE, "show_error": True, "theme": theme(), "css": CSS}


def _hidden(note: str):
    return gr.update(value=note, visible=bool(note))


@dataclass(frozen=True)
class GroundOutputs:
    """The grounding view's output components by name, built once by `build_demo`. Its events list `components` and
    their callbacks return `values(name=value, ...)`, a {component: value} dict: no output depends on its position,
    and a value left out is an error rather than a shifted page."""
    annotated: gr.Image
    box_note: gr.Markdown
    status: gr.Markdown
    itc_note: gr.Markdown
    itc_gallery: gr.Gallery
    gradcam_note: gr.Markdown
    gradcam_gallery: gr.Gallery
    objects_panel: gr.Column
    objects_note: gr.Markdown
    objects_plot: gr.Plot
    objects_table: gr.Dataframe
    scores: gr.Dataframe
    json_file: gr.File

    @property
    def components(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def values(self, **values) -> dict:
        names = {f.name for f in fields(self)}
        if set(values) != names:
            raise TypeError(f"outputs missing: {sorted(names - set(values))}, unknown: {sorted(set(values) - names)}")
        return {getattr(self, k): v for k, v in values.items()}


def view_outputs(view: cb.View, granularity, out: GroundOutputs) -> dict:
    """A callback's `View` -> {component: value} for the grounding view (the objects panel shows at its granularity)."""
    if not view.ok:
        return out.values(annotated=None, box_note=_hidden(""), status=view.message, itc_note="", itc_gallery=[],
                          gradcam_note="", gradcam_gallery=[], objects_panel=gr.update(visible=False),
                          objects_note="", objects_plot=None, objects_table=None, scores=None, json_file=None)
    show_objects = granularity == "objects"
    return out.values(annotated=view.annotated, box_note=_hidden(view.box_note), status=view.message,
                      itc_note=view.itc_note, itc_gallery=view.itc_gallery, gradcam_note=view.gradcam_note,
                      gradcam_gallery=view.gradcam_gallery, objects_panel=gr.update(visible=show_objects),
                      objects_note=view.objects_note, objects_plot=view.objects_figure if show_objects else None,
                      objects_table=view.objects_table if show_objects else None, scores=view.scores,
                      json_file=view.json_path)


def model_guide(g) -> str:
    """The "How to read this" text for a loaded grounder (its box model's config; capabilities include a scorer)."""
    return how_to_read(g.model.cfg, g.capabilities, g.name)


def build_demo(registry: ModelRegistry, assets_dir: str | Path = ASSETS,
               out_dir: str | Path | None = None) -> gr.Blocks:
    """The page for the registry's models; `out_dir` receives the downloadable JSON files (default: a temp folder)."""
    if len(registry) == 0:  # pragma: no cover - app.py refuses to start without a model
        raise ModelUnavailable("no model to serve")
    examples = cb.load_examples(assets_dir)

    @gpu   # ZeroGPU: a request holds the GPU only inside this call (app/zerogpu.py; a no-op without `spaces`)
    def run(model_name, image, phrases, granularity, alpha, layer, want_cam=True, progress=gr.Progress()):
        try:
            if model_name in registry and not registry.is_loaded(model_name):
                progress(0, desc=f"loading the model {model_name}")
            g = registry.get(model_name)
        except ModelUnavailable as e:
            view = cb.View.error(str(e))
        else:
            view = cb.ground_and_render(g, image, phrases, granularity, alpha, layer,
                                        lock=registry.lock(model_name or registry.default), out_dir=out_dir,
                                        gradcam=bool(want_cam), progress=progress)
        if not view.ok:
            gr.Warning(view.message.replace("⚠️ ", "").replace("**", ""))
        return view_outputs(view, granularity, out)

    def rerun(model_name, image, phrases, granularity, alpha, layer, want_cam=True, progress=gr.Progress()):
        """A control changed: redraw if there is something to redraw, stay quiet otherwise."""
        if image is None or not isinstance(phrases, str) or not phrases.strip():
            return gr.skip()                     # every output unchanged
        return run(model_name, image, phrases, granularity, alpha, layer, want_cam, progress)

    @gpu
    def model_changed(model_name):
        """The model line, the Grad-CAM layer selector and the "How to read this" text for the selected model."""
        try:
            g = registry.get(model_name)
        except ModelUnavailable as e:
            gr.Warning(str(e))
            return {model_info: f"⚠️ **{e}**", layer: gr.update(choices=[], value=None, visible=False),
                    guide: f"⚠️ **{e}**"}
        if g.capabilities["gradcam"]:
            layer_update = gr.update(choices=cb.layer_choices(g), value=cb.default_layer(g), visible=True)
        else:
            layer_update = gr.update(choices=[], value=None, visible=False)
        return {model_info: cb.describe_model(g, registry.model_dir(model_name)), layer: layer_update,
                guide: model_guide(g)}

    @gpu
    def api_ground(image, phrases):
        try:
            g = registry.get(registry.default)
            return cb.ground_json(g, image, phrases, lock=registry.lock(registry.default))
        except (cb.InputError, ModelUnavailable) as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            model_dd = gr.Dropdown(registry.names, value=registry.default, label="Model", scale=1,
                                   visible=len(registry) > 1, interactive=True)
            model_info = gr.Markdown(LOADING, elem_classes="note")
        with gr.Accordion("How to read this", open=False):
            guide = gr.Markdown(model_guide(registry.get(registry.default)) if registry.is_loaded(registry.default)
                                else LOADING, elem_id="how-to-read")
            gr.Markdown(ANALYSIS_HOW_TO_READ)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image_in = gr.Image(sources=["upload", "clipboard", "webcam"], type="pil", image_mode=None,
                                    label="Image (upload, paste or webcam)", height=340, elem_id="image-in")
                phrases_in = gr.Textbox(label=f"Phrases, one per line (at most {MAX_PHRASES})", lines=3,
                                        max_lines=MAX_PHRASES, placeholder="the red circle\na small blue square",
                                        elem_id="phrases-in")
                with gr.Row():
                    clear_btn = gr.ClearButton(value="Clear")
                    submit = gr.Button("Ground", variant="primary", elem_id="ground-btn")
                ex = (gr.Examples(examples, inputs=[image_in, phrases_in], label=EXAMPLES_LABEL,
                                  cache_examples=False, examples_per_page=4) if examples else None)
            with gr.Column(scale=6):
                annotated = gr.Image(label="Boxes (one color per phrase; label: ITM · ITC(image))", type="numpy",
                                     interactive=False, format="png", elem_id="boxes-out", height=420)
                status = gr.Markdown(elem_id="status")
                box_note = gr.Markdown(visible=False, elem_classes="note")
        with gr.Row(equal_height=True):
            granularity = gr.Radio(list(cb.GRANULARITIES), value="image", label="Heatmap granularity", scale=3,
                                   info="image: all patches · region: the box's patches · objects: phrase × box")
            alpha = gr.Slider(0.0, 1.0, value=cb.DEFAULT_ALPHA, step=0.05, label="Heatmap opacity", scale=2)
            with gr.Column(scale=2, min_width=200):
                want_cam = gr.Checkbox(True, label="ITM Grad-CAM", info="one backward pass per phrase")
                layer = gr.Dropdown([], label="Grad-CAM layer (fusion layers)", interactive=True)
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("### Patch-ITC heatmaps")
                itc_note = gr.Markdown(elem_classes="note")
                itc_gallery = gr.Gallery(label="patch ITC per phrase", columns=3, height="auto", format="png",
                                         object_fit="contain", elem_id="itc-gallery")
            with gr.Column():
                gr.Markdown("### ITM Grad-CAM")
                gradcam_note = gr.Markdown(elem_classes="note")
                gradcam_gallery = gr.Gallery(label="Grad-CAM per phrase", columns=3, height="auto", format="png",
                                             object_fit="contain", elem_id="gradcam-gallery")
        with gr.Column(visible=False) as objects_panel:
            gr.Markdown("### Objects: phrase × box ITC")
            objects_note = gr.Markdown(elem_classes="note")
            with gr.Row(equal_height=False):
                objects_plot = gr.Plot(label="ITC(phrase, box)", format="png", elem_id="objects-plot")
                objects_table = gr.Dataframe(label="ITC(phrase i, box j)", interactive=False, wrap=True)
        gr.Markdown("### Scores")
        with gr.Row(equal_height=False):
            scores = gr.Dataframe(headers=cb.SCORE_HEADERS, label="per phrase", interactive=False, wrap=True,
                                  elem_id="scores", scale=4)
            json_file = gr.File(label="Everything shown, as JSON", interactive=False, elem_id="json-out",
                                height=120, scale=1, min_width=220)
        build_analysis_panel(registry, model_dd, image_in, phrases_in, layer, alpha)   # app/analysis_panel.py

        # the API: image file + phrases (one per line) -> JSON, with the default model:
        #   gradio_client.Client(url).predict(handle_file(path), "phrase 1\nphrase 2", api_name="/ground")
        with gr.Row(visible=False):
            api_image = gr.Image(type="filepath", label="image")
            api_phrases = gr.Textbox(label="phrases (one per line)")
            api_out = gr.JSON(label="grounding")
            api_btn = gr.Button("ground")
        api_btn.click(api_ground, [api_image, api_phrases], api_out, api_name="ground", preprocess=False,
                      api_description="Ground phrases (one per line) in an image with the default model: boxes "
                                      "(pixels, xyxy), ITC (image, region, objects), ITM, patch heatmaps.")

        out = GroundOutputs(annotated=annotated, box_note=box_note, status=status, itc_note=itc_note,
                            itc_gallery=itc_gallery, gradcam_note=gradcam_note, gradcam_gallery=gradcam_gallery,
                            objects_panel=objects_panel, objects_note=objects_note, objects_plot=objects_plot,
                            objects_table=objects_table, scores=scores, json_file=json_file)
        inputs = [model_dd, image_in, phrases_in, granularity, alpha, layer, want_cam]
        ev = dict(fn=run, inputs=inputs, outputs=out.components, preprocess=False, api_visibility="private",
                  concurrency_id="ground")
        submit.click(**ev)
        phrases_in.submit(**ev)
        quiet = {**ev, "fn": rerun, "trigger_mode": "always_last"}
        granularity.change(**quiet)
        alpha.release(**quiet)
        layer.input(**quiet)
        want_cam.input(**quiet)
        if ex is not None:
            ex.load_input_event.then(**ev)
        clear_btn.add([image_in, phrases_in, annotated, status, itc_gallery, gradcam_gallery, scores, json_file])
        build_search_tab(registry, image_in, phrases_in, ev, assets_dir)   # app/search_tab.py
        model_outputs = [model_info, layer, guide]
        model_dd.change(model_changed, model_dd, model_outputs, api_visibility="private").then(**quiet)
        demo.load(model_changed, model_dd, model_outputs, api_visibility="private")
    return demo
