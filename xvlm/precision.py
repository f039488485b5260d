"""Inference precision of a Grounder: "fp32" (default, exact), "bf16" (autocast) or "int8" (dynamic quantisation).

- fp32: the official numerics on every device; the default for every model, official or ours (issue #22: a lower
  precision is a named option, never a silent one). The shipped default model is small enough that fp32 costs little.
- bf16: `torch.autocast(device, bfloat16)` around the forward passes (weights stay fp32; matmuls and convolutions run
  in bf16 through oneDNN on CPU, cuBLAS on CUDA); heads' outputs are read back in fp32. Fast on CPUs with bf16
  instructions (avx512_bf16 / AMX); on others oneDNN emulates it and it is usually slower than fp32
  (`bf16_note()` says which, and `Grounder.precision_note` carries it).
- int8: `torch.ao.quantization.quantize_dynamic` of the encoders' and fusion's `nn.Linear` layers (int8 weights,
  activations quantised per batch at run time), CPU only. Convolutions, LayerNorm, attention products, embeddings,
  the ITC projections and the heads stay fp32. Quantised layers have no autograd, so Grad-CAM is unavailable at
  int8.

How far the two leave fp32 is measured by `python -m xvlm.precision --drift` (max |delta| of box, ITC, ITM on the
official fixture) and published in benchmarks/RESULTS.md with the default model's Acc@0.5.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "int8")
NO_GRADCAM_INT8 = "int8 layers (dynamic quantisation) have no autograd; load the model with precision='fp32' or 'bf16'"


def check(precision: str | None, device: torch.device) -> str:
    precision = "fp32" if precision is None else str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("precision='int8' (dynamic quantisation) runs on the CPU only; use 'bf16' on a GPU")
    return precision


def cpu_has_bf16() -> bool:
    """Whether oneDNN finds native bf16 instructions (avx512_bf16, AMX, or ARM bf16) on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_note(device: torch.device) -> str | None:
    if device.type == "cpu" and not cpu_has_bf16():
        return ("this CPU has no bf16 instructions (avx512_bf16 / AMX): bf16 is emulated and usually slower than "
                "fp32 here")
    return None


ENCODERS = ("vision_encoder.", "text_encoder.")   # what int8 quantises; heads and projections stay fp32


def apply(model: nn.Module, precision: str) -> nn.Module:
    """The model to run at `precision`: itself for fp32 / bf16 (autocast does the rest), an int8 copy for int8.

    int8 quantises the encoders' and fusion's `nn.Linear` layers, where the time goes. The ITC projections and the
    ITM, box and MLM heads stay fp32: they are a few small matrices per phrase (no speed to gain) and their outputs
    are the numbers a user reads (box, ITC, ITM), so quantising them would add error and buy nothing."""
    if precision != "int8":
        return model
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    copied = copy.deepcopy(model).cpu().eval()
    spec = {name: default_dynamic_qconfig for name, m in copied.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(ENCODERS)}
    with warnings.catch_warnings():          # torch deprecates the quantised tensor constructors in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copied, spec, dtype=torch.qint8)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- drift against fp32 -------------------------------------------------------------------------------------------
def drift(reference, other, images, phrases) -> dict[str, float]:
    """Max |delta| of box (normalised cxcywh), ITC image / region and ITM between two Grounders over images x
    phrases."""
    out = {"box": 0.0, "itc_image": 0.0, "itc_region": 0.0, "itm": 0.0}
    for image in images:
        for a, b in zip(reference.ground(image, phrases), other.ground(image, phrases)):
            if a.box_cxcywh is not None:
                out["box"] = max(out["box"], max(abs(x - y) for x, y in zip(a.box_cxcywh, b.box_cxcywh)))
            for k in ("itc_image", "itc_region", "itm"):
                if getattr(a, k) is not None:
                    out[k] = max(out[k], abs(getattr(a, k) - getattr(b, k)))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m xvlm.precision --drift`: print the drift of bf16 and int8 against fp32 on the official fixture."""
    import argparse
    import json

    from .grounder import Grounder

    p = argparse.ArgumentParser(prog="python -m xvlm.precision")
    p.add_argument("--drift", action="store_true", help="measure bf16 / int8 against fp32 on a fixture")
    p.add_argument("--fixture", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"
                                            / "official-xvlm-small"))
    a = p.parse_args(argv)
    if not a.drift:
        p.print_help()
        return 0
    f = Path(a.fixture)
    kw = dict(config=f / "Grounding_bbox.yaml", tokenizer=f / "vocab.txt", device="cpu")
    ref = Grounder.from_official(f / "checkpoint.pth", **kw)
    cases = json.loads((f / "cases.json").read_text())["cases"]
    images = sorted({f / c["image"] for c in cases})
    phrases = list(dict.fromkeys(c["phrase"] for c in cases))
    print(f"cpu bf16 instructions: {cpu_has_bf16()}")
    for prec in ("bf16", "int8"):
        g = Grounder.from_official(f / "checkpoint.pth", precision=prec, **kw)
        d = drift(ref, g, images, phrases)
        print(f"{prec}: " + "  ".join(f"max|d {k}| {v:.2e}" for k, v in d.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PRECISIONS", "check", "apply", "autocast", "cpu_has_bf16", "bf16_note", "drift"]
