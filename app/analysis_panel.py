"""The "Analysis" section of the page: counterfactual phrase lab, what-is-this-region and per-word Grad-CAM maps, and
their named API endpoints (`/counterfactuals`, `/describe_region`, `/word_maps`, default model). Layout and wiring
only; the computing is in `app/analysis_view.py`. `app/ui.py` calls `build_analysis_panel` inside its Blocks."""
from __future__ import annotations

import gradio as gr

from . import analysis_view as av
from . import callbacks as cb
from .models import ModelUnavailable
from .zerogpu import gpu

HOW_TO_READ = """
**Found / not found.** The verdict column says whether the phrase's object is in the image at all. Its score starts
from ITM; a calibrated model (`python -m xvlm calibrate`) also weighs ITC(region) and compares against its own
threshold. *uncalibrated*: the model has no fitted threshold and ITM ≥ 0.5 counts as found. A phrase judged absent is
drawn dashed and grey, labelled "not found" (with "?" when uncalibrated).

**Evidence for the box.** The bbox head and the maps are different heads, so the demo checks whether they agree: the
share of the patch-ITC heatmap's positive mass inside the box, and whether its hottest patch lies inside (the
pointing game); the same for the Grad-CAM map when it is computed. A box that no map supports is flagged ⚠.

**Counterfactual lab.** One-word edits of a phrase (colour, shape/noun, left↔right, above↔below, small↔large, one
word dropped), grounded together on the cached image: if the box and ITM do not move when a word changes, the model
does not read that word. **What is this region?** Click two corners (or type x0, y0, x1, y1): candidate phrases are
ranked by ITC with that region's visual concept — the object granularity read the other way. **Per-word maps.** The
ITM Grad-CAM of each word: only that word's rows of the cross-attention (the LAVIS way).
"""


def build_analysis_panel(registry, model_dd, image_in, phrases_in, layer, alpha) -> None:
    """Add the analysis accordion and the three API endpoints to the Blocks being built."""

    def grounder(model_name):
        return registry.get(model_name or registry.default), registry.lock(model_name or registry.default)

    def load(model_name, progress):
        """(grounder, lock, None) for the selected model, or (None, None, the message to show) when it cannot be
        loaded; the progress bar says it is loading meanwhile."""
        progress(0, desc="loading the model")
        try:
            return *grounder(model_name), None
        except ModelUnavailable as e:
            return None, None, f"⚠️ **{e}**"

    def first_phrase(own, phrases):
        own = own if isinstance(own, str) and own.strip() else (phrases or "").strip().split("\n")[0]
        return own

    @gpu   # ZeroGPU: model work holds the GPU only inside these calls (app/zerogpu.py; a no-op without `spaces`)
    def counterfactual(model_name, image, phrase, phrases, progress=gr.Progress()):
        g, lock, error = load(model_name, progress)
        if error:
            return None, None, error
        progress(0.3, desc="grounding the edits")
        v = av.counterfactual_view(g, image, first_phrase(phrase, phrases), lock)
        return v.image, v.table, v.message

    @gpu
    def region(model_name, image, box, candidates, progress=gr.Progress()):
        g, lock, error = load(model_name, progress)
        if error:
            return None, None, error
        v = av.region_view(g, image, box, candidates, lock)
        return v.image, v.table, v.message

    def region_source(image):
        """The uploaded image for clicking corners, and its scale (display pixels -> image pixels)."""
        try:
            pil = cb.read_image(image)
        except cb.InputError:
            return None, None, ""
        disp = cb._display_copy(pil)
        return disp, [pil.width / disp.shape[1], pil.height / disp.shape[0]], ""

    def corner(box, scale, evt: gr.SelectData):
        sx, sy = scale or (1.0, 1.0)
        x, y = evt.index[:2]
        return av.click_corner(box, x * sx, y * sy)

    @gpu
    def show_word_maps(model_name, image, phrase, phrases, layer_value, alpha_value, progress=gr.Progress()):
        g, lock, error = load(model_name, progress)
        if error:
            return None, gr.update(choices=[], value=None), error, [], []
        progress(0.3, desc="Grad-CAM per word (one backward pass)")
        v = av.word_maps_view(g, image, first_phrase(phrase, phrases), layer_value, lock,
                              alpha=cb._finite(alpha_value, cb.DEFAULT_ALPHA))
        if not v.ok:
            return None, gr.update(choices=[], value=None), v.message, [], []
        return (gr.update(value=v.image, label=f"Grad-CAM of “{v.words[0]}”"),
                gr.update(choices=v.words, value=v.words[0]), v.message, v.maps, v.words)

    def pick_word(word, maps, names):
        if not maps or word not in (names or []):
            return gr.skip()
        return gr.update(value=maps[names.index(word)], label=f"Grad-CAM of “{word}”")

    def api(fn):
        @gpu
        def call(*args):
            try:
                g, lock = grounder(registry.default)
                return fn(g, *args, lock=lock)
            except (cb.InputError, ModelUnavailable) as e:
                raise gr.Error(str(e)) from None
        return call

    with gr.Accordion("Analysis: counterfactual edits, what is this region, per-word maps", open=False,
                      elem_id="analysis"):
        with gr.Accordion("How to read the analysis", open=False):
            gr.Markdown(HOW_TO_READ)
        gr.Markdown("### Counterfactual phrase lab")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                cf_phrase = gr.Textbox(label="Phrase (empty: the first phrase above)", elem_id="cf-phrase")
                cf_btn = gr.Button("Ground its edits", elem_id="cf-btn")
                cf_note = gr.Markdown(elem_classes="note", elem_id="cf-note")
            cf_image = gr.Image(label="the original and the edits whose box moved most", type="numpy",
                                interactive=False, format="png", elem_id="cf-overlay", scale=3)
        cf_table = gr.Dataframe(headers=av.CF_HEADERS, label="edits", interactive=False, wrap=True,
                                elem_id="cf-table")

        gr.Markdown("### What is this region?")
        scale = gr.State(None)
        with gr.Row(equal_height=False):
            region_img = gr.Image(label="click two corners of a region", type="numpy", interactive=False,
                                  format="png", elem_id="region-src", scale=3)
            with gr.Column(scale=2):
                region_box = gr.Textbox(label="Region x0, y0, x1, y1 (pixels of the image)", elem_id="region-box")
                region_cands = gr.Textbox(label="Candidate phrases, one per line (empty: from the model's vocabulary)",
                                          lines=3, elem_id="region-cands")
                region_btn = gr.Button("Describe the region", elem_id="region-btn")
                region_note = gr.Markdown(elem_classes="note", elem_id="region-note")
        with gr.Row(equal_height=False):
            region_out = gr.Image(label="the region", type="numpy", interactive=False, format="png",
                                  elem_id="region-out")
            region_table = gr.Dataframe(headers=av.REGION_HEADERS, label="candidates ranked by ITC",
                                        interactive=False, elem_id="region-table")

        gr.Markdown("### Per-word ITM Grad-CAM")
        maps_state, words_state = gr.State([]), gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                wm_phrase = gr.Textbox(label="Phrase (empty: the first phrase above)", elem_id="wm-phrase")
                wm_btn = gr.Button("Grad-CAM per word", elem_id="wm-btn")
                wm_word = gr.Radio([], label="Word", elem_id="wm-word")
                wm_note = gr.Markdown(elem_classes="note", elem_id="wm-note")
            wm_image = gr.Image(label="Grad-CAM of the selected word", type="numpy", interactive=False,
                                format="png", elem_id="wm-image", scale=3)

    private = dict(api_visibility="private")
    cf_btn.click(counterfactual, [model_dd, image_in, cf_phrase, phrases_in], [cf_image, cf_table, cf_note],
                 preprocess=False, concurrency_id="ground", **private)
    image_in.change(region_source, image_in, [region_img, scale, region_box], preprocess=False, **private)
    region_img.select(corner, [region_box, scale], region_box, **private)
    region_btn.click(region, [model_dd, image_in, region_box, region_cands], [region_out, region_table, region_note],
                     preprocess=False, concurrency_id="ground", **private)
    wm_btn.click(show_word_maps, [model_dd, image_in, wm_phrase, phrases_in, layer, alpha],
                 [wm_image, wm_word, wm_note, maps_state, words_state], preprocess=False, concurrency_id="ground",
                 **private)
    wm_word.input(pick_word, [wm_word, maps_state, words_state], wm_image, **private)

    # named API endpoints with the default model (gradio_client: api_name="/counterfactuals", ...)
    with gr.Row(visible=False):
        a_image = gr.Image(type="filepath", label="image")
        a_phrase = gr.Textbox(label="phrase")
        a_box = gr.Textbox(label="region x0, y0, x1, y1")
        a_cands = gr.Textbox(label="candidates (one per line; empty: the model's vocabulary)")
        a_layer = gr.Number(label="Grad-CAM layer (empty: the middle fusion layer)", value=None)
        a_out = gr.JSON(label="result")
        b1, b2, b3 = gr.Button("cf"), gr.Button("region"), gr.Button("words")
    b1.click(api(av.counterfactuals_json), [a_image, a_phrase], a_out, api_name="counterfactuals", preprocess=False,
             api_description="One-word edits of a phrase grounded as one batch: box IoU with the original, ITM and "
                             "ITC changes, each edit's full result.")
    b2.click(api(av.describe_region_json), [a_image, a_box, a_cands], a_out, api_name="describe_region",
             preprocess=False,
             api_description="Candidate phrases ranked by ITC with a region's visual concept (box x0, y0, x1, y1).")
    b3.click(api(av.word_maps_json), [a_image, a_phrase, a_layer], a_out, api_name="word_maps", preprocess=False,
             api_description="Per-word ITM Grad-CAM maps of a phrase (each word's cross-attention rows).")
