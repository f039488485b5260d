"""The public API: `Grounder` grounds phrases in an image and returns the multi-grained X-VLM signals.

Data path of `ground` (one image encoding, one batched text + fusion pass for all phrases):
    image -> load_image (RGB as the model's `VisionConfig.convert` says) -> image_to_tensor (squash or letterbox:
          `Canvas`) -> vision encoder (LRU-cached by pixel hash) -> tokens [1, 1+N, C]
          -> each fusion layer's cross-attention keys/values (kept in the same cache entry)
    phrases -> Tokenizer -> text encoder -> fusion over the whole image -> bbox head (box), itm head (ITM)
    projected patch features x projected text [CLS] -> image / region / object ITC and the patch heatmap
    -> xvlm.postprocess: boxes in pixels of the original image, heatmaps, concept pooling, the phrase x box matrix

The Grounder orchestrates: tokenising, the image-encoding cache, batching, locking, device and precision. What the
outputs mean in pixels lives in xvlm.postprocess; retrieval (xvlm.retrieval, xvlm.index) and the analysis tools
(xvlm.analysis) live in their modules and reach the models through the public members `itc_model`, `itm_model`,
`read_image`, `encode` and `inference`; the Grounder's methods for them only delegate.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import analysis, postprocess
from . import precision as _precision
from .checkpoint import load_official, load_pretrained
from .config import PRESETS, XVLMConfig, from_official_yaml, get_preset
from .hub import default_weights, resolve_model
from .limits import MAX_PHRASES                      # re-exported: `from xvlm.grounder import MAX_PHRASES`
from .models import XVLM, FusionKeysValues, ImageContext, PackedText
from .preprocess import (Canvas, InputError, Pixels, Tokenizer, check_phrase, conversion_notes, decode_image,
                         image_to_tensor, load_image)
from .vocabulary import note_unknown_words

DEFAULT_WEIGHTS = default_weights()   # weights/xvlm-shapes of a checkout, or the installed package's copy (xvlm.hub)

NO_BOX = "the model has no bbox head (e.g. the weakly-supervised grounding checkpoint)"
NO_ITC = "the model has no ITC head (vision_proj/text_proj), e.g. the RefCOCO+ bbox checkpoint; pair it with a scorer"
NO_ITM = "the model has no ITM head, e.g. the RefCOCO+ bbox checkpoint; pair it with a scorer"


def note_text(key: str, value: str | list[str]) -> str:
    """A note as one line of text: most notes are sentences; a list (`unknown_words`) is named by its key."""
    return f"{key.replace('_', ' ')}: {', '.join(value)}" if isinstance(value, list) else value


@dataclass
class GroundingResult:
    phrase: str
    caption: str                                   # the text the model saw, after pre_caption
    image_size: tuple[int, int]                    # (W, H) of the original image
    # The model's square input in pixels of the original image: what the patch grids below cover. The image itself
    # unless the model letterboxes (`VisionConfig.resize`); None: the whole image.
    canvas_xyxy: tuple[float, float, float, float] | None = None
    box_xyxy: list[float] | None = None            # pixels of the original image, clipped to it (what is drawn)
    box_cxcywh: list[float] | None = None          # normalised, exactly the bbox head output
    # the head's box in pixels as predicted, possibly past the image's edges: what the official evaluation
    # (`grounding_eval_bbox`) scores and what parity is checked on
    box_xyxy_unclipped: list[float] | None = None
    itc_image: float | None = None                 # cosine(image [CLS] feature, text [CLS] feature)
    itc_region: float | None = None                # cosine(predicted-box concept feature, text feature)
    itc_objects: list[float] | None = None         # cosine with each phrase's box concept, in phrase order
    itm: float | None = None                       # ITM match probability
    patch_heatmap: np.ndarray | None = None        # (G, G) cosine(vision_proj(patch), text_proj(text [CLS]))
    region_mask: np.ndarray | None = None          # (G, G) bool: patches of the predicted box (its concept)
    notes: dict[str, str | list[str]] = field(default_factory=dict)   # why a field is None, truncation, unknown_words
    # xvlm.analysis: the not-found verdict (ITM against the model's calibrated threshold) and how far the box is
    # supported by the patch-ITC heatmap (and Grad-CAM when computed); None where the model lacks the heads
    found: bool | None = None
    found_score: float | None = None
    found_calibrated: bool | None = None           # False: the model has no fitted threshold, ITM >= 0.5 was used
    evidence: dict | None = None

    @property
    def canvas(self) -> Canvas:
        return Canvas(*(self.canvas_xyxy or (0.0, 0.0, *map(float, self.image_size))))

    def cells_on_image(self, grid_size: int | None = None) -> np.ndarray | None:
        """(G, G) bool: the cells of a patch grid (default: the heatmap's) over the image, not over letterbox padding.
        Colour scales and argmaxes read these."""
        if grid_size is None:
            if self.patch_heatmap is None:
                return None
            grid_size = self.patch_heatmap.shape[0]
        return self.canvas.cells_on_image(grid_size, self.image_size)

    def to_dict(self) -> dict:
        def arr(a):
            return None if a is None else np.asarray(a).tolist()
        return {"phrase": self.phrase, "caption": self.caption, "image_size": list(self.image_size),
                "canvas_xyxy": arr(self.canvas_xyxy), "box_xyxy": self.box_xyxy, "box_cxcywh": self.box_cxcywh,
                "box_xyxy_unclipped": self.box_xyxy_unclipped,
                "itc_image": self.itc_image, "itc_region": self.itc_region, "itc_objects": self.itc_objects,
                "itm": self.itm,
                "patch_heatmap": arr(self.patch_heatmap), "region_mask": arr(self.region_mask), "notes": self.notes,
                "found": self.found, "found_score": self.found_score, "found_calibrated": self.found_calibrated,
                "evidence": self.evidence}


@dataclass
class ImageEncoding:
    tokens: torch.Tensor                 # [1, 1+N, C] vision encoder output (token 0 = mean of patches)
    size: tuple[int, int]                # (W, H) of the original image
    # The fusion layers' cross-attention keys/values of these tokens per model that queried them ("box", "scorer":
    # two models may share the tokens, not their cross-attention). The Grounder adds one with the first query
    # (`Grounder.keys_values`), so later queries on the image skip the projections.
    fusion_keys_values: dict[str, FusionKeysValues] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        kvs = tuple(self.fusion_keys_values.values())   # one C call: safe beside a query that adds an entry
        return self.tokens.numel() * self.tokens.element_size() + sum(kv.nbytes for kv in kvs)


class EncodingCache:
    """Bounded LRU of image encodings, keyed by a hash of the decoded pixels and the model that encoded them."""

    def __init__(self, max_entries: int = 16, max_bytes: int = 512 * 2**20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, ImageEncoding] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> ImageEncoding | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, item: ImageEncoding) -> None:
        self._items[key] = item
        self._items.move_to_end(key)
        self.trim()

    def trim(self) -> None:
        """Evict least recently used entries beyond the bounds (entries grow when queries add keys/values)."""
        while len(self._items) > self.max_entries or (len(self._items) > 1 and self.nbytes > self.max_bytes):
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def snapshot(self) -> "OrderedDict[str, ImageEncoding]":
        return OrderedDict(self._items)

    def restore(self, items: "OrderedDict[str, ImageEncoding]") -> None:
        self._items = OrderedDict(items)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Grounder:
    """Ground phrases with an X-VLM model; optionally score them with a second model (`scorer`) that has ITC/ITM heads
    when the box model has none (the official RefCOCO+ bbox checkpoint)."""

    def __init__(self, model: XVLM, tokenizer: Tokenizer, device: str | torch.device | None = None,
                 scorer: XVLM | None = None, cache_entries: int = 16, name: str = "model",
                 precision: str | None = None):
        self.device = torch.device(device) if device is not None else pick_device()
        # "fp32" (default: official numerics), "bf16" (autocast) or "int8" (CPU, dynamic quantisation): xvlm.precision
        self.precision = _precision.check(precision, self.device)
        self.precision_note = _precision.bf16_note(self.device) if self.precision == "bf16" else None
        if scorer is not None and scorer.cfg.vision != model.cfg.vision:
            raise ValueError("the scorer's vision encoder config differs from the box model's")
        self._shared_vision = scorer is None or self._same_vision(model, scorer)
        self.model = _precision.apply(model.eval(), self.precision).to(self.device)
        self.scorer = _precision.apply(scorer.eval(), self.precision).to(self.device) if scorer is not None else None
        self.tokenizer = tokenizer
        self.name = name
        self.cache = EncodingCache(max_entries=cache_entries)
        self.stats = {"vision_passes": 0, "cache_hits": 0}
        self._lock = threading.RLock()

    @staticmethod
    def _same_vision(model, scorer) -> bool:
        """Whether the two models' vision encoders hold the same weights: then one vision pass serves both."""
        return _same_weights(model.vision_encoder, scorer.vision_encoder)

    def compile_vision(self) -> "Grounder":
        """torch.compile the vision encoder(s) in place (parameter names unchanged). Worth it on a GPU, where the
        vision pass dominates; compilation happens on the first call, so follow with `warmup()`."""
        self.model.vision_encoder.compile()
        if self.scorer is not None and not self._shared_vision:
            self.scorer.vision_encoder.compile()
        return self

    def warmup(self) -> "Grounder":
        """One query on a blank image, so that the first user does not pay for lazy initialisation (CUDA context and
        kernels, autocast, torch.compile). Leaves the cache and the counters as they were."""
        with self._lock:
            stats, entries = dict(self.stats), self.cache.snapshot()
            self.ground(np.full((64, 64, 3), 127, dtype=np.uint8), "warm up")
            if self.capabilities["gradcam"]:
                self.gradcam(np.full((64, 64, 3), 127, dtype=np.uint8), "warm up")
            self.cache.restore(entries)
            self.stats.update(stats)
        return self

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, revision: str | None = None,
                        cache_dir: str | Path | None = None, scorer: str | Path | None = None,
                        backend: str = "torch", **kw) -> "Grounder":
        """Our format (config.json + model.safetensors + vocab.txt) from a local folder or a Hub repo id ("org/name"
        at `revision`, cached in `cache_dir`; an existing local folder of that name wins; HF_HUB_OFFLINE=1 reads the
        cache only: xvlm.hub). No argument: the shipped default model. `scorer`: a second model folder / repo whose
        ITC/ITM heads score the boxes of a box-only model. `backend="onnxruntime"`: a folder written by
        `python -m xvlm export-onnx` (xvlm.onnx_backend; `scorer` then is an export too). `precision=` "fp32" |
        "bf16" | "int8" (xvlm.precision)."""
        if path is None:
            path = DEFAULT_WEIGHTS
        else:
            path = resolve_model(path, revision=revision, cache_dir=cache_dir)
        if backend == "onnxruntime":
            from .onnx_backend import OnnxGrounder

            if scorer is not None:
                kw["scorer"] = resolve_model(scorer, cache_dir=cache_dir)
            return OnnxGrounder.from_folder(path, name=kw.pop("name", _model_name(path)), **kw)
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model in {path}: expected config.json, model.safetensors and vocab.txt"
                                    + (" (the default model is trained with `python -m xvlm train`)"
                                       if path == DEFAULT_WEIGHTS else ""))
        model = load_pretrained(path)
        tokenizer = Tokenizer.for_config(path, model.cfg)
        if scorer is not None:
            kw["scorer"] = load_pretrained(resolve_model(scorer, cache_dir=cache_dir))
        return cls(model, tokenizer, name=kw.pop("name", _model_name(path)), **kw)

    @classmethod
    def from_official(cls, checkpoint: str | Path, config: str | Path | None = None, preset: str | None = None,
                      tokenizer: str | Path | None = None, scorer_checkpoint: str | Path | None = None,
                      **kw) -> "Grounder":
        """An official X-VLM or X²-VLM checkpoint, shaped by its task YAML (`config`) or a built-in `preset`. A
        scorer checkpoint is shaped by the same config (X²-VLM: a 224-px pre-trained scorer beside the 384-px
        grounding model gets its relative position tables resized as the official fine-tuning load does)."""
        cfg = _official_config(config, preset)
        if tokenizer is None:
            raise ValueError("official checkpoints need a tokenizer: the bert-base-uncased vocab.txt (or its folder)")
        model = load_official(checkpoint, cfg)
        scorer = load_official(scorer_checkpoint, cfg) if scorer_checkpoint is not None else None
        tok = Tokenizer.for_config(tokenizer, cfg)        # grounding_truncation="positions" (_official_config)
        if tok.vocab_size != cfg.text.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model expects {cfg.text.vocab_size}")
        return cls(model, tok, scorer=scorer, name=kw.pop("name", Path(checkpoint).name), **kw)

    # --- what this grounder can compute -------------------------------------------------------------------------
    @property
    def itc_model(self) -> XVLM | None:
        """The model whose ITC heads score (the box model when it has them, else the scorer); None: neither has."""
        return next((m for m in (self.model, self.scorer) if m is not None and "itc" in m.heads), None)

    @property
    def itm_model(self) -> XVLM | None:
        """The model whose ITM head scores and whose cross-attention Grad-CAM reads; None: neither has one."""
        return next((m for m in (self.model, self.scorer) if m is not None and "itm" in m.heads), None)

    @property
    def capabilities(self) -> dict[str, bool]:
        return {"box": "bbox" in self.model.heads, "itc": self.itc_model is not None,
                "itm": self.itm_model is not None,
                "gradcam": self.itm_model is not None and "gradcam" not in self.unavailable}

    @property
    def unavailable(self) -> dict[str, str]:
        """Why a capability is off although the model has the heads for it (precision, backend)."""
        return {"gradcam": _precision.NO_GRADCAM_INT8} if self.precision == "int8" else {}

    @property
    def grid_size(self) -> int:
        return self.model.cfg.vision.grid_size

    def canvas(self, image_size: tuple[int, int]) -> Canvas:
        """Where an image of this size sits in the model's square input (both models share the vision config)."""
        return postprocess.canvas(self.model.cfg.vision, image_size)

    # --- image side ---------------------------------------------------------------------------------------------
    def encode_image(self, image, model: XVLM | None = None) -> ImageEncoding:
        """Vision tokens of `image` for `model` (default: the box model), from the cache when the pixels were seen."""
        return self.encode(self.read_image(image), model or self.model)

    def encode(self, px: Pixels, model: XVLM) -> ImageEncoding:
        """`encode_image` of pixels already read (`read_image`): the cached encoding, or one vision pass."""
        if model is self.scorer and self._shared_vision:
            model = self.model
        role = self._role(model)                             # the cache belongs to this Grounder and its two models
        res = model.cfg.vision.image_res
        key = f"{px.digest}|{res}|{role}"
        with self._lock:                                    # concurrent callers on one image: one vision pass
            hit = self.cache.get(key)
            if hit is not None:
                self.stats["cache_hits"] += 1
                return hit
            pixels = image_to_tensor(px.image, res, model.cfg.vision.resize).unsqueeze(0).to(self.device)
            with self.inference():
                tokens = model.encode_image(pixels).float()
            self.stats["vision_passes"] += 1
            enc = ImageEncoding(tokens, px.image.size)
            self.cache.put(key, enc)
            return enc

    def keys_values(self, enc: ImageEncoding, model: XVLM) -> FusionKeysValues:
        """`model`'s fusion-layer keys/values of an image encoding (`encode(px, model)`), kept in that cached entry:
        projected by the first query on the image, shared by every phrase of every later one. Call under
        `inference()` (autocast)."""
        role = self._role(model)
        kv = enc.fusion_keys_values.get(role)
        if kv is None:
            kv = model.image_keys_values(enc.tokens)
            with self._lock:                     # the entry's bytes grow: `_finish` trims the cache
                kv = enc.fusion_keys_values.setdefault(role, kv)
        return kv

    def _role(self, model: XVLM) -> str:
        return "box" if model is self.model else "scorer"

    def inference(self) -> contextlib.ExitStack:
        """No autograd; autocast only when a lower precision was asked for (the heads' outputs are read back in
        float32). Feature modules run their model calls under it."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_precision.autocast(self.device, self.precision))
        return stack

    # --- grounding ----------------------------------------------------------------------------------------------
    def ground(self, image, phrases: str | list[str]) -> GroundingResult | list[GroundingResult]:
        px, text, results = self._prepare(image, phrases)
        with self.inference():
            run = _Pass(self, px, PackedText.of(text.input_ids.to(self.device), text.attention_mask.to(self.device)))
            boxes, fused = self._boxes(run, results)
            self._itm(run, fused, results)
            self._itc(run, boxes, results)
        return self._finish(results, single=isinstance(phrases, str))

    # `_prepare` and `_finish` are the protected hooks of the backend contract: a subclass (xvlm.onnx_backend) that
    # computes boxes and scores its own way calls them around its `ground`, so input checks, notes, the verdict and
    # the cache bound are the same for every backend.
    def _prepare(self, image, phrases: str | list[str]):
        """The input side of `ground` (any backend): decoded pixels, tokens, and results with the text's notes."""
        phrase_list = check_phrases([phrases] if isinstance(phrases, str) else phrases)
        px = self.read_image(image)                  # decoded and hashed once per call
        text = self.tokenizer(phrase_list)
        size, canvas = px.image.size, self.canvas(px.image.size).xyxy
        results = [GroundingResult(p, c, size, canvas) for p, c in zip(phrase_list, text.captions)]
        for r, cut in zip(results, text.truncated):
            if cut:
                r.notes["truncated"] = self._truncation_note()
        note_unknown_words(results, self.tokenizer, self.model.cfg.words)     # notes["unknown_words"]
        return px, text, results

    def _finish(self, results: list[GroundingResult], single: bool):
        """The output side of `ground` (any backend), once boxes and scores are in."""
        analysis.annotate(self, results)             # verdict and evidence agreement, from what was just computed
        with self._lock:
            self.cache.trim()                        # the pass may have added fusion keys/values to an entry
        return results[0] if single else results

    def _boxes(self, run: "_Pass", results):
        """Boxes from the fused [CLS] over the whole image; also returns that fused output, which the ITM head reads
        too (the official ITM path fuses with the same all-ones image mask)."""
        if "bbox" not in self.model.heads:
            for r in results:
                r.notes["box"] = NO_BOX
            return None, None
        m = self.model
        fused = run.fused_cls(m)
        coords = m.predict_bbox(fused).float()
        postprocess.set_boxes(results, coords)
        return coords, fused

    def _itm(self, run: "_Pass", box_fused, results) -> None:
        m = self.itm_model
        if m is None:
            for r in results:
                r.notes["itm"] = NO_ITM
            return
        if box_fused is not None and m is self.model:
            fused = box_fused
        else:
            fused = run.fused_cls(m)
        probs = m.itm_logits(fused).float().softmax(dim=-1)[:, 1].cpu()
        for r, p in zip(results, probs):
            r.itm = float(p)

    def _itc(self, run: "_Pass", boxes, results) -> None:
        m = self.itc_model
        if m is None:
            for r in results:
                r.notes["itc"] = NO_ITC
            return
        tokens = run.tokens(m)
        text_feat = m.text_features(run.text.firsts(run.embeds(m))).float()   # [P, D]
        postprocess.set_image_itc(results, text_feat, m.image_features(tokens[0]).float(), self.grid_size)
        if boxes is None:
            for r in results:
                r.notes["itc_region"] = NO_BOX
            return
        concepts, masks = postprocess.pool_concepts(tokens, boxes, self.grid_size, fmt="cxcywh")   # one per phrase
        sims = postprocess.phrase_box_matrix(text_feat, m.image_features(concepts).float())       # [phrase, box]
        postprocess.set_region_itc(results, sims, masks, self.grid_size)

    def concepts(self, image, boxes) -> torch.Tensor:
        """Each box's visual concept [CLS] on the ITC model — the mean of the patch tokens the box covers, before
        `vision_proj` — [boxes, width]. Boxes are xyxy in pixels of the original image."""
        m = self.itc_model
        if m is None:
            raise RuntimeError(NO_ITC)
        px = self.read_image(image)
        norm = self.normalised_boxes(px, boxes)
        tokens = self.encode(px, m).tokens
        with self.inference():
            return postprocess.pool_concepts(tokens, norm, self.grid_size, fmt="xyxy")[0].float()

    def normalised_boxes(self, px: Pixels, boxes) -> torch.Tensor:
        """Pixel xyxy boxes on the image -> [B, 4] canvas coordinates in [0, 1] on this grounder's device
        (`postprocess.normalise_boxes`: InputError for empty or inverted boxes)."""
        return postprocess.normalise_boxes(self.canvas(px.size), px.size, boxes).to(self.device)

    def concept_scores(self, image, phrases: list[str], boxes) -> np.ndarray:
        """ITC similarity of each phrase with each box's visual concept (object granularity): [phrases, boxes].
        Boxes are xyxy in pixels of the original image."""
        m = self.itc_model
        if m is None:
            raise RuntimeError(NO_ITC)
        phrase_list = check_phrases(phrases)
        concepts = self.concepts(image, boxes)     # validates the boxes before anything is encoded
        text = self.tokenizer(phrase_list)
        with self.inference():
            ids, mask = text.input_ids.to(self.device), text.attention_mask.to(self.device)
            text_feat = m.text_features(m.encode_text(ids, mask)).float()
            concept_feats = m.image_features(concepts.to(text_feat.dtype))
            return postprocess.phrase_box_matrix(text_feat, concept_feats).float().cpu().numpy()

    def gradcam(self, image, phrase: str, layer: int | None = None) -> np.ndarray:
        """The official weakly-supervised grounding map (Grounding.py): Grad-CAM of the ITM positive logit w.r.t. a
        fusion layer's cross-attention, positive gradients times attention, averaged over heads and text tokens.
        `layer` indexes the BERT layers (fusion layers are >= fusion_layer); default: the middle fusion layer.
        Like `patch_heatmap`, the (G, G) map covers the model's input (`canvas(image_size)`), padding included."""
        return self.gradcam_tokens(image, phrase, layer).mean(1)[0].float().cpu().numpy()

    def gradcam_tokens(self, image, phrase: str, layer: int | None = None) -> torch.Tensor:
        """`gradcam` before the mean over text tokens: one map per token row of the cross-attention, [1, T, G, G]
        (token 0 is [CLS]); per-word maps (`xvlm.analysis.wordmaps`) read the rows of each word's tokens. The
        attention probabilities come from this call's own fusion pass (`fuse(return_attention=layer)`), so calls
        may run concurrently."""
        m = self.itm_model
        if m is None:
            raise RuntimeError(NO_ITM)
        if "gradcam" in self.unavailable:
            raise RuntimeError(self.unavailable["gradcam"])
        (phrase,) = check_phrases([phrase])
        layer = postprocess.gradcam_layer(m.cfg, layer)
        tokens = self.encode_image(image, m).tokens.clone()   # cached under inference_mode: a plain copy for autograd
        text = self.tokenizer([phrase])
        ids, mask = text.input_ids.to(self.device), text.attention_mask.to(self.device)
        with torch.enable_grad():
            out = m.fuse(m.encode_text(ids, mask), mask, tokens.float(), return_attention=layer)
            logit = m.itm_logits(out.hidden)[:, 1].sum()
            (grads,) = torch.autograd.grad(logit, out.attention)
        return postprocess.gradcam_token_maps(out.attention, grads, mask, self.grid_size)

    # --- analysis (xvlm.analysis; these methods only delegate) ---------------------------------------------------
    def counterfactuals(self, image, phrase: str, kinds=None):
        """The phrase and its one-word edits (colour, noun, direction, size, drop) grounded as one batch, with each
        edit's box IoU and ITM / ITC change against the original: `analysis.counterfactual.Counterfactuals`."""
        from .analysis.counterfactual import counterfactuals
        return counterfactuals(self, image, phrase, kinds)

    def describe_region(self, image, box_xyxy, candidates=None, top_k: int | None = None):
        """Candidate phrases (default: from the model's vocabulary) ranked by ITC with the box's visual concept:
        [`analysis.describe.RegionCandidate`], best first."""
        from .analysis.describe import describe_region
        return describe_region(self, image, box_xyxy, candidates, top_k)

    def word_gradcams(self, image, phrase: str, layer: int | None = None):
        """The ITM Grad-CAM of each word of the phrase (its tokens' cross-attention rows): `analysis.wordmaps`."""
        from .analysis.wordmaps import word_gradcams
        return word_gradcams(self, image, phrase, layer)

    def evidence_with_gradcam(self, result: GroundingResult, gradcam: np.ndarray) -> dict | None:
        """Update `result.evidence` with the agreement of its Grad-CAM map (computed by `gradcam`) and its box."""
        from .analysis.evidence import add_gradcam
        return add_gradcam(result, gradcam)

    def _truncation_note(self) -> str:
        n = self.tokenizer.max_tokens
        if n >= self.model.cfg.text.max_position_embeddings:
            return (f"phrase cut at the text encoder's {n} position embeddings (the official grounding evaluation "
                    "does not truncate, but no model reads past that)")
        return f"phrase truncated to the model's {n} tokens"

    # --- input conversion: the image as this model reads it -------------------------------------------------------
    def read_image(self, image) -> Pixels:
        """`image` decoded as this model reads it (`VisionConfig.convert`) and hashed: pass it to `encode` and the
        other methods that take an image, so that one call decodes and hashes once."""
        return Pixels.of(image, self.model.cfg.vision.convert)

    def image_as_seen(self, image) -> tuple[Image.Image, list[str]]:
        """The RGB image this model reads from `image` (`VisionConfig.convert`; official checkpoints: exactly
        `Image.open(p).convert('RGB')`), and how it differs from the file as a viewer shows it (empty: it does not)."""
        decoded = decode_image(image)
        convert = self.model.cfg.vision.convert
        return load_image(decoded, convert=convert), conversion_notes(decoded, convert)

    # --- retrieval over a gallery (xvlm.retrieval, xvlm.index): these methods only delegate ----------------------
    def retrieval_scores(self, images, texts: list[str], k_test: int = 256):
        """The official `Retrieval.py` evaluation: ITC matrix [images x texts] and the ITM-logit re-ranked i2t / t2i
        score matrices (-100 outside each query's ITC top-k_test). See `xvlm.retrieval.retrieval_scores`."""
        from . import retrieval
        return retrieval.retrieval_scores(self, images, texts, k_test=k_test)

    def index_images(self, images, index=None, **kw):
        """Encode images into a persisted gallery index (a folder), adding to `index` if given. See
        `xvlm.index.index_images`."""
        from . import index as gallery_index
        return gallery_index.index_images(self, images, index=index, **kw)

    def search(self, index, phrase: str, k: int = 10, rerank: int | None = None, ground: bool = True):
        """The gallery images `phrase` describes, best first, each with its ITC, ITM logit / probability and box."""
        from . import index as gallery_index, retrieval
        return retrieval.search(self, gallery_index.as_index(index), phrase, k=k, rerank=rerank, ground=ground)

    def search_texts(self, image, texts: list[str], k: int | None = None, rerank: int | None = None):
        """Image -> text: `texts` ranked for `image` (ITC, then the top `rerank` by the ITM logit)."""
        from . import retrieval
        return retrieval.search_texts(self, image, texts, k=k, rerank=rerank)


class _Pass:
    """One `ground` call's shared work: image tokens and text embeddings computed at most once per model. The
    phrases travel packed (no padding) through the text and fusion layers, each phrase's [CLS] read out at the end."""

    def __init__(self, grounder: Grounder, px: Pixels, text: PackedText):
        self.grounder, self.px, self.text = grounder, px, text
        self._embeds: dict[int, torch.Tensor] = {}

    def tokens(self, model: XVLM) -> torch.Tensor:
        return self.grounder.encode(self.px, model).tokens

    def embeds(self, model: XVLM) -> torch.Tensor:
        """Text-layer output of the packed phrases, [1, n, H]."""
        if id(model) not in self._embeds:
            t = self.text
            self._embeds[id(model)] = model.encode_text(t.input_ids, t.attention_mask, t.position_ids)
        return self._embeds[id(model)]

    def fused_cls(self, model: XVLM) -> torch.Tensor:
        """Every phrase fused with the whole image, each phrase's fused [CLS] as [P, 1, H] (the last fusion layer
        computes only those rows: the heads read nothing else)."""
        t = self.text
        enc = self.grounder.encode(self.px, model)
        return model.fuse(self.embeds(model), t.attention_mask, ImageContext.single(enc.tokens, 1), last_rows=t.starts,
                          keys_values=self.grounder.keys_values(enc, model)).transpose(0, 1)


def check_phrases(phrases) -> list[str]:
    """A list of phrases as the Grounder takes them (at most MAX_PHRASES, each `check_phrase`d); InputError if not."""
    if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)):
        raise InputError("phrases must be a string or a list of strings")
    if not phrases:
        raise InputError("no phrases given")
    if len(phrases) > MAX_PHRASES:
        raise InputError(f"too many phrases ({len(phrases)}); at most {MAX_PHRASES} at once")
    return [check_phrase(p) for p in phrases]



def _official_config(config, preset) -> XVLMConfig:
    if (config is None) == (preset is None):
        raise ValueError(f"give exactly one of config= (an official task YAML) or preset= (one of {sorted(PRESETS)})")
    cfg = from_official_yaml(config) if config is not None else get_preset(preset)
    # The official grounding evaluations tokenize with padding='longest' and no truncation (the YAML's max_tokens is
    # a training and retrieval setting): phrases are cut only where BERT has no position embedding left.
    return dataclasses.replace(cfg, grounding_truncation="positions")


def _model_name(path: Path) -> str:
    """A Hub snapshot folder is named by its commit; name the model by its repo (models--org--name) instead."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return "/".join(parts[-3].split("--")[1:])
    return path.name


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


__all__ = ["Grounder", "GroundingResult", "EncodingCache", "ImageEncoding", "InputError", "Pixels", "check_phrases"]
