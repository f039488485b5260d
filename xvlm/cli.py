"""`python -m xvlm <command>`: ground phrases in an image; train / eval / bench are dispatched lazily.

    python -m xvlm ground IMAGE PHRASE [PHRASE ...] [--model DIR [--scorer DIR] | --checkpoint CKPT
                          (--config YAML | --preset NAME) --tokenizer VOCAB [--scorer-checkpoint CKPT]]
                          [--json [--heatmaps]] [--out figure.png] [--gradcam-layer N]
                          [--device cpu|cuda] [--precision fp32|bf16|int8] [--backend torch|onnxruntime]
    python -m xvlm train|eval|bench|convert|export-onnx ...   (their modules parse their own arguments)

User errors (missing or unreadable files, empty phrases, checkpoints that do not fit) print one line on stderr and
exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
# command -> module with `main(argv: list[str]) -> int | None`; imported only when the command is used
# ("module:function" names another entry point than `main`)
LAZY_COMMANDS = {"train": "xvlm.training.cli", "eval": "xvlm.evaluate", "bench": "xvlm.bench",
                 "refcoco": "xvlm.refcoco", "calibrate": "xvlm.analysis.verdict",
                 "index": "xvlm.search_cli:index_main", "search": "xvlm.search_cli:search_main",
                 "convert": "xvlm.convert", "export-onnx": "xvlm.onnx_backend"}
HEATMAP_KEYS = ("patch_heatmap", "region_mask")

USAGE = """usage: python -m xvlm <command> [args]

commands:
  ground   ground phrases in an image (python -m xvlm ground --help)
  train    train a model (xvlm.training)
  eval     evaluate a model (xvlm.evaluate)
  bench    benchmark a model (xvlm.bench)
  refcoco  the official RefCOCO+ box evaluation of an official checkpoint (xvlm.refcoco)
  index    index a folder of images for search (xvlm.search_cli)
  search   search an index by phrase (xvlm.search_cli)
  calibrate  fit the not-found verdict's threshold on present / absent phrases (xvlm.analysis.verdict)
  convert  official checkpoint -> model folder (model.safetensors, config.json, vocab.txt, card) (xvlm.convert)
  export-onnx  model folder -> ONNX graphs for the onnxruntime backend (xvlm.onnx_backend)
"""


class UsageError(ValueError):
    """A bad command line; shown as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .preprocess import InputError

    return (InputError, CheckpointError, FileNotFoundError, IsADirectoryError, NotImplementedError, ValueError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.removeprefix("[Errno 2] ")


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


# --- ground ------------------------------------------------------------------------------------------------------
def ground_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xvlm ground",
        description="Ground phrases in an image with X-VLM: a box per phrase, ITC (image / region) and ITM scores.")
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("phrases", nargs="+", metavar="PHRASE", help="one or more referring phrases")
    src = p.add_argument_group("model (default: the shipped model in weights/)")
    src.add_argument("--model", metavar="DIR", help="a model folder saved by save_pretrained "
                                                    "(config.json, model.safetensors, vocab.txt), or a Hugging Face "
                                                    "Hub repo id org/name (HF_HUB_OFFLINE=1: cache only)")
    src.add_argument("--revision", metavar="REV", help="with a Hub --model: branch, tag or commit")
    src.add_argument("--scorer", metavar="DIR", help="a second model folder (with --backend onnxruntime: a second "
                                                     "export) whose ITC/ITM heads score the boxes of --model")
    src.add_argument("--checkpoint", metavar="CKPT", help="an official X-VLM or X²-VLM checkpoint (.pth/.th)")
    src.add_argument("--config", metavar="YAML", help="the official task YAML of --checkpoint")
    src.add_argument("--preset", metavar="NAME", help="a built-in configuration for --checkpoint instead of --config")
    src.add_argument("--tokenizer", metavar="VOCAB", help="BERT vocab.txt (or its folder) for --checkpoint")
    src.add_argument("--scorer-checkpoint", metavar="CKPT",
                     help="a second official checkpoint with ITC/ITM heads to score the boxes of --checkpoint")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object per phrase and line")
    out.add_argument("--heatmaps", action="store_true", help="with --json: include patch_heatmap and region_mask")
    out.add_argument("--out", metavar="FIGURE", help="save the per-phrase heatmap figure (.png, .pdf, .svg)")
    out.add_argument("--gradcam-layer", type=int, metavar="N",
                     help="fusion layer for the ITM Grad-CAM column of --out (default: the middle fusion layer)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="fp32 (default, exact), bf16 (autocast) or int8 (CPU, dynamic quantisation of Linear layers)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="onnxruntime: --model is a folder written by `python -m xvlm export-onnx`")
    return p


# What `_check_args` and `_load_grounder` read; commands whose parsers offer only some of these (index, search,
# refcoco) get the rest
MODEL_DEFAULTS = {"model": None, "revision": None, "scorer": None, "checkpoint": None, "config": None, "preset": None,
                  "tokenizer": None, "scorer_checkpoint": None, "device": None, "precision": "fp32", "backend": "torch"}


def _model_options(a: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**MODEL_DEFAULTS, **vars(a)})


def _check_args(a: argparse.Namespace) -> None:
    a = _model_options(a)
    if a.model and a.checkpoint:
        raise UsageError("give either --model or --checkpoint, not both")
    if a.scorer and a.checkpoint:
        raise UsageError("--scorer goes with --model; an official --checkpoint takes --scorer-checkpoint")
    if a.checkpoint:
        if (a.config is None) == (a.preset is None):
            raise UsageError("--checkpoint needs exactly one of --config YAML or --preset NAME")
        if a.tokenizer is None:
            raise UsageError("--checkpoint needs --tokenizer (the bert-base-uncased vocab.txt or its folder)")
        for flag, path in (("--checkpoint", a.checkpoint), ("--config", a.config), ("--tokenizer", a.tokenizer),
                           ("--scorer-checkpoint", a.scorer_checkpoint)):
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{flag} file not found: {path}")
    elif a.config or a.preset or a.tokenizer or a.scorer_checkpoint:
        raise UsageError("--config, --preset, --tokenizer and --scorer-checkpoint go with --checkpoint")
    for flag, folder in (("--model", a.model), ("--scorer", a.scorer)):
        if folder and not Path(folder).is_dir():
            from .hub import is_repo_id

            if not is_repo_id(folder):
                raise FileNotFoundError(f"{flag} folder not found: {folder}")
    if a.revision and not a.model:
        raise UsageError("--revision goes with --model org/name")
    if a.backend == "onnxruntime" and (a.checkpoint or a.precision != "fp32"):
        raise UsageError("--backend onnxruntime takes an exported --model folder, in fp32")
    if a.heatmaps and not a.json:
        raise UsageError("--heatmaps goes with --json")
    if a.out is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        ext = Path(a.out).suffix.lower().lstrip(".")
        supported = FigureCanvasBase.get_supported_filetypes()
        if ext not in supported:
            raise UsageError(f"--out {a.out}: unsupported figure format {ext!r}; use one of .png, .pdf, .svg, .jpg")


def _load_grounder(a: argparse.Namespace):
    from .grounder import Grounder

    a = _model_options(a)

    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
    if a.checkpoint:
        return Grounder.from_official(a.checkpoint, config=a.config, preset=a.preset, tokenizer=a.tokenizer,
                                      scorer_checkpoint=a.scorer_checkpoint, device=a.device, precision=a.precision)
    try:
        if a.backend == "onnxruntime":
            return Grounder.from_pretrained(a.model, revision=a.revision, scorer=a.scorer, backend="onnxruntime")
        return Grounder.from_pretrained(a.model, revision=a.revision, scorer=a.scorer, device=a.device,
                                        precision=a.precision)
    except FileNotFoundError as e:
        if a.model is None:
            raise FileNotFoundError(f"{e}. Or pass a model: --model DIR, or --checkpoint CKPT --config YAML "
                                    "--tokenizer VOCAB") from e
        raise


def compute_gradcams(g, image, phrases: list[str], layer: int | None = None) -> dict:
    """{phrase: (G, G) Grad-CAM} for the figure's ITM column (one image encoding, shared through the cache), all at
    one layer: `layer`, checked before any map is computed, or the model's default (`postprocess`)."""
    from .postprocess import gradcam_layer

    layer = gradcam_layer(g.itm_model.cfg, layer)
    return {p: g.gradcam(image, p, layer=layer) for p in dict.fromkeys(phrases)}


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def format_table(results, image_name: str, model_name: str) -> str:
    """A readable block per phrase: box in pixels, ITC image / region, ITM, notes."""
    W, H = results[0].image_size
    lines = [f"image: {image_name} ({W}x{H})   model: {model_name}", ""]
    for i, r in enumerate(results, 1):
        box = ("n/a" if r.box_xyxy is None else
               "x0 {:.1f}  y0 {:.1f}  x1 {:.1f}  y1 {:.1f}  ({:.0f}x{:.0f} px)".format(
                   *r.box_xyxy, r.box_xyxy[2] - r.box_xyxy[0], r.box_xyxy[3] - r.box_xyxy[1]))
        lines.append(f"[{i}] {r.phrase}")
        if r.caption != r.phrase:
            lines.append(f"    model text  : {r.caption}")
        lines.append(f"    box (px)    : {box}")
        lines.append(f"    ITC image   : {_fmt(r.itc_image)}")
        lines.append(f"    ITC region  : {_fmt(r.itc_region)}")
        lines.append(f"    ITM         : {_fmt(r.itm)}")
        if r.found is not None:
            lines.append(f"    found       : {'yes' if r.found else 'NOT FOUND'} (score {r.found_score:.3f}"
                         + (", uncalibrated threshold 0.5)" if not r.found_calibrated else ")"))
        if r.evidence:
            from .analysis.evidence import flag
            mass = _fmt(r.evidence["itc_mass_in_box"], ".2f")
            lines.append(f"    evidence    : {flag(r)}; heatmap mass in box {mass}, "
                         f"hottest patch in box {'yes' if r.evidence['itc_peak_in_box'] else 'no'}")
        for k, v in r.notes.items():
            lines.append(f"    note {k:<7}: {', '.join(v) if isinstance(v, list) else v}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def ground_main(argv: list[str]) -> int:
    a = ground_parser().parse_args(argv)
    try:
        _check_args(a)
        from .preprocess import check_phrase, decode_image

        # cheap input checks before the (slow) model load
        phrases = [check_phrase(p) for p in a.phrases]
        decoded = decode_image(a.image)
        g = _load_grounder(a)
        image, conversion = g.image_as_seen(decoded)      # the model's reading of the file: what is shown
        for note in conversion:
            print(f"note: the model reads {Path(a.image).name} differently from an image viewer: {note}",
                  file=sys.stderr)
        results = g.ground(image, phrases)
        cams = None
        if a.out is not None:  # before printing anything: a bad --gradcam-layer fails without partial output
            if g.capabilities.get("gradcam"):
                cams = compute_gradcams(g, image, phrases, a.gradcam_layer)
                for r in results:                    # the evidence block gains the Grad-CAM agreement
                    g.evidence_with_gradcam(r, cams[r.phrase])
            elif a.gradcam_layer is not None:
                print("warning: the model has no ITM head, so the figure has no Grad-CAM column", file=sys.stderr)
        if a.json:
            for r in results:
                d = r.to_dict()
                if not a.heatmaps:
                    for k in HEATMAP_KEYS:
                        d.pop(k, None)
                print(json.dumps(d), flush=True)
        else:
            sys.stdout.write(format_table(results, Path(a.image).name, g.name))
        if a.out is not None:
            from .render import heatmap_figure, save_figure

            path = save_figure(heatmap_figure(image, results, cams), a.out)
            print(f"figure saved to {path}", file=sys.stderr)
    except _user_errors() as e:
        return _fail(_one_line(e))
    except OSError as e:  # e.g. --out in a folder we may not write to
        return _fail(_one_line(e), 1)
    return 0


# --- dispatch ----------------------------------------------------------------------------------------------------
def _run_lazy(command: str, argv: list[str]) -> int:
    module_name, _, function = LAZY_COMMANDS[command].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return _fail(f"command {command!r} is not available in this installation ({module_name} is missing)")
    code = getattr(module, function or "main")(argv)
    return 0 if code is None else int(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(USAGE)
        return EXIT_USAGE
    if argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "ground":
            return ground_main(rest)
        if command in LAZY_COMMANDS:
            return _run_lazy(command, rest)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return _fail(f"unknown command {command!r}; choose one of: ground, {', '.join(LAZY_COMMANDS)}")


__all__ = ["main", "ground_main", "ground_parser", "format_table", "compute_gradcams", "LAZY_COMMANDS"]
