"""ONNX export and an ONNX Runtime `Grounder`.

    python -m xvlm export-onnx --model DIR|org/name --out DIR [--opset 17]

writes these graphs (fp32, dynamic batch and sequence length) beside config.json and vocab.txt:
    vision.onnx    pixels [B, 3, R, R]                      -> image tokens [B, 1+N, C]         (the vision encoder)
    fusion_kv.onnx image tokens [1, 1+N, C]                 -> fusion_keys_values               (each fusion layer's
                                                               [L, 2, 1, heads, 1+N, head_dim]   cross-attention K, V)
    text.onnx      input_ids, attention_mask [P, T],
                   fusion_keys_values                       -> box [P, 4], itm_logits [P, 2],   (text + fusion + heads;
                                                               text_feat [P, D]                  the outputs the model's
                                                                                                 heads have)
    proj.onnx      tokens [M, C]                            -> L2-normalised vision_proj [M, D] (image / patch / concept
                                                                                                 ITC features)
and onnx.json (format version, graph names, outputs, opset, a digest of the vision weights, and the parity with
PyTorch fp32 measured at export). fusion_kv.onnx exists when the model has a box or ITM head (a model with ITC alone
never fuses).

`Grounder.from_pretrained(DIR, backend="onnxruntime")` returns an `OnnxGrounder`: the same `ground` / `concepts` /
`concept_scores` API and results, and the same cache as PyTorch: an image's tokens and its fusion keys/values are
kept with its encoding (by pixel hash), so a follow-up query on the same image runs only text.onnx, and the phrases
of a query share one image's keys/values instead of projecting them per phrase. Phrases are padded to the longest
in the query (the PyTorch path packs them; the padding is masked, the numbers agree within the parity bound).
Grad-CAM needs autograd, which ONNX Runtime's inference sessions do not have: `capabilities["gradcam"]` is False and
`unavailable["gradcam"]` says why. A box-only model pairs with a scorer as on PyTorch: export both, then
`Grounder.from_pretrained(BOX_EXPORT, backend="onnxruntime", scorer=SCORER_EXPORT)`; the boxes come from the first,
ITM and ITC from the second, and one vision pass serves both when their vision digests agree. Parity with PyTorch
fp32 on the official fixture and for a paired box model + scorer: tests/test_onnx.py (within 1e-4).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import postprocess
from .grounder import NO_ITC, Grounder, GroundingResult, check_phrases
from .models import FusionKeysValues, ImageContext

MANIFEST = "onnx.json"
FORMAT = 2          # 2: text.onnx reads fusion_keys_values (1 read image tokens and projected them per phrase)
GRAPHS = {"vision": "vision.onnx", "fusion_kv": "fusion_kv.onnx", "text": "text.onnx", "proj": "proj.onnx"}
NO_GRADCAM_ONNX = ("Grad-CAM needs autograd (gradients of the ITM logit w.r.t. cross-attention), which ONNX Runtime "
                   "inference sessions do not compute; use the PyTorch backend for it")
OPSET = 17


# --- export -------------------------------------------------------------------------------------------------------
class _Vision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.encode_image(pixels)


class _FusionKeysValues(nn.Module):
    """One image's cross-attention keys/values in every fusion layer, stacked: what every phrase of every query on
    that image shares (`XVLM.image_keys_values`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_tokens):
        return torch.stack([torch.stack(kv) for kv in self.model.image_keys_values(image_tokens).layers])


class _TextFusionHeads(nn.Module):
    """Padded phrases attending to one image through its keys/values: the heads' outputs (the same numbers as the
    packed PyTorch path)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def outputs(self) -> list[str]:
        heads = self.model.heads
        return [n for n, h in (("box", "bbox"), ("itm_logits", "itm"), ("text_feat", "itc")) if h in heads]

    def fuses(self) -> bool:
        return "bbox" in self.model.heads or "itm" in self.model.heads

    def forward(self, input_ids, attention_mask, fusion_keys_values):
        m = self.model
        embeds = m.encode_text(input_ids, attention_mask)
        out = []
        if self.fuses():
            kv = FusionKeysValues(tuple((layer[0], layer[1]) for layer in fusion_keys_values))
            # A shared, unmasked image whose keys/values are given: the context's tokens are never read, only its
            # kind, so a zero-patch stand-in keeps the image tokens out of this graph. Only the last layer's [CLS]
            # row is computed: the heads read nothing else.
            image = ImageContext.single(embeds[:1, :1], input_ids.shape[0])
            fused = m.fuse(embeds, attention_mask, image, last_rows=torch.zeros(1, dtype=torch.long), keys_values=kv)
            if "bbox" in m.heads:
                out.append(m.predict_bbox(fused))
            if "itm" in m.heads:
                out.append(m.itm_logits(fused))
        if "itc" in m.heads:
            out.append(m.text_features(embeds))
        return tuple(out)


class _Proj(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.image_features(tokens)


def export(model_dir: str | Path, out: str | Path, opset: int = OPSET, overwrite: bool = False) -> dict:
    """Export the model in `model_dir` (a folder or Hub repo id) to `out`; returns the manifest written."""
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an ONNX export; pass --overwrite to replace it")
    g = Grounder.from_pretrained(model_dir, device="cpu")
    m, cfg = g.model, g.model.cfg
    R, C = cfg.vision.image_res, cfg.vision.width
    # wrappers in eval mode: the exporter restores each wrapper's mode afterwards, recursively into the model
    vision, kv, text, proj = _Vision(m).eval(), _FusionKeysValues(m).eval(), _TextFusionHeads(m).eval(), _Proj(m).eval()
    if not text.outputs():
        raise ValueError("the model has none of the bbox / itm / itc heads")
    out.mkdir(parents=True, exist_ok=True)
    for stale in GRAPHS.values():          # an export over an older one must not leave graphs this one lacks
        (out / stale).unlink(missing_ok=True)
    ids = g.tokenizer(["a red circle", "the big blue square on the left"])
    tokens = torch.randn(1, 1 + cfg.vision.grid_size ** 2, C)
    common = dict(dynamo=False, opset_version=opset, do_constant_folding=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # tracer warnings on shape arithmetic that is constant for a fixed R
        torch.onnx.export(vision, (torch.randn(1, 3, R, R),), out / GRAPHS["vision"], input_names=["pixels"],
                          output_names=["tokens"], dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}},
                          **common)
        text_dynamic = {"input_ids": {0: "phrases", 1: "length"}, "attention_mask": {0: "phrases", 1: "length"},
                        **{o: {0: "phrases"} for o in text.outputs()}}
        if text.fuses():
            torch.onnx.export(kv, (tokens,), out / GRAPHS["fusion_kv"], input_names=["image_tokens"],
                              output_names=["fusion_keys_values"], **common)
            keys_values = kv(tokens)
        else:
            keys_values = torch.zeros(0)    # not read: the text graph has no fusion
        torch.onnx.export(text, (ids.input_ids, ids.attention_mask, keys_values), out / GRAPHS["text"],
                          input_names=["input_ids", "attention_mask", "fusion_keys_values"],
                          output_names=text.outputs(), dynamic_axes=text_dynamic, **common)
        if "itc" in m.heads:
            torch.onnx.export(proj, (tokens[0],), out / GRAPHS["proj"], input_names=["tokens"],
                              output_names=["features"], dynamic_axes={"tokens": {0: "n"}, "features": {0: "n"}},
                              **common)
    assert not m.training
    src = Path(g.tokenizer.vocab_file).parent
    for name in ("config.json", "vocab.txt"):
        if (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
    manifest = {"format": "xvlm-onnx", "version": FORMAT, "opset": opset, "source": str(model_dir),
                "graphs": {k: v for k, v in GRAPHS.items() if (out / v).is_file()}, "text_outputs": text.outputs(),
                "vision_sha256": vision_digest(m)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["parity"] = parity(g, OnnxGrounder.from_folder(out))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def vision_digest(model) -> str:
    """sha256 of the vision encoder's weights (names and bytes): two exports with equal digests share vision passes
    when paired (box model + scorer)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.vision_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def parity(reference: Grounder, other: Grounder, images=None, phrases=None) -> dict[str, float]:
    """Max |delta| between two grounders' outputs (box, ITC image / region, ITM, patch heatmap)."""
    rng = np.random.default_rng(0)
    images = images or [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
                        rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)]
    phrases = phrases or ["a red circle", "the big blue square on the left", "something"]
    d = {"box": 0.0, "itc_image": 0.0, "itc_region": 0.0, "itm": 0.0, "patch_heatmap": 0.0}
    for image in images:
        for a, b in zip(reference.ground(image, phrases), other.ground(image, phrases)):
            if a.box_cxcywh is not None:
                d["box"] = max(d["box"], float(np.abs(np.subtract(a.box_cxcywh, b.box_cxcywh)).max()))
            for k in ("itc_image", "itc_region", "itm"):
                if getattr(a, k) is not None:
                    d[k] = max(d[k], abs(getattr(a, k) - getattr(b, k)))
            if a.patch_heatmap is not None:
                d["patch_heatmap"] = max(d["patch_heatmap"], float(np.abs(a.patch_heatmap - b.patch_heatmap).max()))
    return d


# --- runtime ------------------------------------------------------------------------------------------------------
class _OrtModel:
    """The vision graph behind the interface the Grounder's cache calls (`encode_image`, `cfg`, `heads`)."""

    def __init__(self, folder: Path, cfg, threads: int | None):
        import onnxruntime as ort

        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("version", 1) != FORMAT:
            raise ValueError(f"{folder} is an ONNX export of format {manifest.get('version', 1)}, this version reads "
                             f"format {FORMAT} (image keys/values computed once per image): run `python -m xvlm "
                             f"export-onnx --model MODEL --out {folder} --overwrite` again")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {k: ort.InferenceSession(str(folder / v), opts, providers=["CPUExecutionProvider"])
                         for k, v in manifest["graphs"].items()}
        self.text_outputs = manifest["text_outputs"]
        self.text_inputs = {i.name for i in self.sessions["text"].get_inputs()}
        self.vision_sha256 = manifest.get("vision_sha256")       # None: exported before digests were written
        self.cfg = cfg

    @classmethod
    def load(cls, folder: str | Path, threads: int | None) -> "_OrtModel":
        from .checkpoint import CONFIG_NAME
        from .config import XVLMConfig

        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"no ONNX export in {folder} ({MANIFEST} missing): run `python -m xvlm "
                                    f"export-onnx --model MODEL --out {folder}` first")
        return cls(folder, XVLMConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text())), threads)

    @property
    def heads(self) -> tuple[str, ...]:
        return self.cfg.heads

    def eval(self):
        return self

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU here (CPUExecutionProvider)")
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        (tokens,) = self.sessions["vision"].run(None, {"pixels": pixels.cpu().numpy()})
        return torch.from_numpy(tokens)

    def image_keys_values(self, tokens: torch.Tensor) -> "_StackedKeysValues":
        """What the Grounder's cache keeps with an image's encoding (`Grounder.keys_values`), as the graph made it."""
        (stacked,) = self.sessions["fusion_kv"].run(None, {"image_tokens": tokens.cpu().numpy()})
        return _StackedKeysValues(tuple((torch.from_numpy(k), torch.from_numpy(v)) for k, v in stacked), stacked)

    def text(self, input_ids, attention_mask, keys_values: "_StackedKeysValues | None") -> dict[str, np.ndarray]:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if "fusion_keys_values" in self.text_inputs:
            feed["fusion_keys_values"] = keys_values.stacked
        outs = self.sessions["text"].run(None, feed)
        return dict(zip(self.text_outputs, outs))

    @property
    def fuses(self) -> bool:
        return "fusion_kv" in self.sessions

    def image_features(self, tokens: torch.Tensor) -> torch.Tensor:
        (feats,) = self.sessions["proj"].run(None, {"tokens": tokens.reshape(-1, tokens.shape[-1]).cpu().numpy()})
        return torch.from_numpy(feats).reshape(*tokens.shape[:-1], -1)


@dataclass(frozen=True)
class _StackedKeysValues(FusionKeysValues):
    """FusionKeysValues (per-layer views, for the cache's byte count) that also keep the graph's stacked array, fed
    back to text.onnx without a copy."""
    stacked: np.ndarray = None


class OnnxGrounder(Grounder):
    """A Grounder whose forward passes run in ONNX Runtime (CPU, fp32); see the module docstring."""

    @classmethod
    def from_folder(cls, folder: str | Path, threads: int | None = None, scorer: str | Path | None = None,
                    **kw) -> "OnnxGrounder":
        """The export in `folder`; `scorer`: a second export whose ITC/ITM heads score the first one's boxes."""
        from .preprocess import Tokenizer

        if kw.pop("precision", "fp32") not in (None, "fp32"):
            raise ValueError("the onnxruntime backend runs the exported fp32 graphs: precision must be 'fp32'")
        model = _OrtModel.load(folder, threads)
        tok = Tokenizer(Path(folder), max_tokens=model.cfg.max_tokens, max_words=model.cfg.max_words)
        if scorer is not None:
            kw["scorer"] = _OrtModel.load(scorer, threads)
        kw.setdefault("device", "cpu")
        return cls(model, tok, name=kw.pop("name", Path(folder).name), **kw)

    @staticmethod
    def _same_vision(model: _OrtModel, scorer: _OrtModel) -> bool:
        return model.vision_sha256 is not None and model.vision_sha256 == scorer.vision_sha256

    @property
    def unavailable(self) -> dict[str, str]:
        return {"gradcam": NO_GRADCAM_ONNX}

    def compile_vision(self) -> "OnnxGrounder":
        return self                      # ONNX Runtime optimises the graphs itself when the session starts

    def gradcam(self, image, phrase: str, layer: int | None = None) -> np.ndarray:
        raise RuntimeError(NO_GRADCAM_ONNX)

    def ground(self, image, phrases: str | list[str]) -> GroundingResult | list[GroundingResult]:
        px, text, results = self._prepare(image, phrases)        # the torch Grounder's input and output sides
        runs: dict[str, tuple[torch.Tensor, dict[str, np.ndarray]]] = {}

        def run(m: _OrtModel):
            """(image tokens, text graph outputs) of one model, once per query: the box model, the scorer, or both."""
            role = self._role(m)
            if role not in runs:
                enc = self.encode(px, m)
                runs[role] = enc.tokens, m.text(text.input_ids, text.attention_mask,
                                                self.keys_values(enc, m) if m.fuses else None)
            return runs[role]

        boxes = None
        if "bbox" in self.model.heads:
            boxes = torch.from_numpy(run(self.model)[1]["box"])
            postprocess.set_boxes(results, boxes)
        else:
            for r in results:
                r.notes["box"] = self._note("box")
        if self.itm_model is not None:
            probs = torch.from_numpy(run(self.itm_model)[1]["itm_logits"]).softmax(dim=-1)[:, 1]
            for r, p in zip(results, probs):
                r.itm = float(p)
        else:
            for r in results:
                r.notes["itm"] = self._note("itm")
        if self.itc_model is None:
            for r in results:
                r.notes["itc"] = NO_ITC
        else:
            tokens, out = run(self.itc_model)
            self._itc_onnx(self.itc_model, tokens, torch.from_numpy(out["text_feat"]), boxes, results)
        return self._finish(results, single=isinstance(phrases, str))

    def _note(self, what: str) -> str:
        from .grounder import NO_BOX, NO_ITM

        return {"box": NO_BOX, "itm": NO_ITM}[what]

    def _itc_onnx(self, m: _OrtModel, tokens, text_feat, boxes, results) -> None:
        G = self.grid_size
        postprocess.set_image_itc(results, text_feat, m.image_features(tokens[0]), G)    # features [1+N, D]
        if boxes is None:
            for r in results:
                r.notes["itc_region"] = self._note("box")
            return
        concepts, masks = postprocess.pool_concepts(tokens, boxes, G, fmt="cxcywh")
        postprocess.set_region_itc(results, postprocess.phrase_box_matrix(text_feat, m.image_features(concepts)),
                                   masks, G)

    def concept_scores(self, image, phrases: list[str], boxes) -> np.ndarray:
        m: _OrtModel | None = self.itc_model
        if m is None:
            raise RuntimeError(NO_ITC)
        phrase_list = check_phrases(phrases)
        concepts = self.concepts(image, boxes)
        text = self.tokenizer(phrase_list)
        enc = self.encode(self.read_image(image), m)
        kv = self.keys_values(enc, m) if m.fuses else None
        text_feat = torch.from_numpy(m.text(text.input_ids, text.attention_mask, kv)["text_feat"])
        return postprocess.phrase_box_matrix(text_feat, m.image_features(concepts)).numpy()


# --- CLI ----------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvlm export-onnx",
                                description="Export a model folder to ONNX graphs for the onnxruntime backend.")
    p.add_argument("--model", metavar="DIR", help="model folder or Hub repo id (default: the shipped model)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the graphs, config.json, vocab.txt")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    a = parser().parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        print(f"error: export-onnx needs onnx and onnxruntime (pip install 'xvlm-grounding[onnx]'): {e}",
              file=sys.stderr)
        return 2
    try:
        manifest = export(a.model, a.out, opset=a.opset, overwrite=a.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    worst = max(manifest["parity"].values())
    print(f"wrote {a.out}/ ({', '.join(manifest['graphs'].values())}); max |onnxruntime - pytorch| on random inputs: "
          f"{worst:.2e}", file=sys.stderr)
    return 0


__all__ = ["export", "parity", "vision_digest", "OnnxGrounder", "main", "NO_GRADCAM_ONNX"]
