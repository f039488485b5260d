"""`python -m xvlm bench`: how fast a box appears after a phrase is typed.

    python -m xvlm bench [--models default,base] [--repeats 5] [--warmup 1] [--threads N] [--device cpu|cuda]
                         [--precision fp32|bf16|int8]
                         [--compile] [--image PNG | --image-size WxH] [--markdown RESULTS.md]

For each model it times the queries a grounding demo makes, through the public `Grounder` API:

    first query          new image: preprocessing + vision encoder + text/fusion + heads + ITC heatmap
    follow-up query      the image is in the encoding cache; a new phrase (text/fusion + heads + heatmap)
    8 phrases batched    one call, 8 phrases, cached image (one batched text/fusion pass)
    cache-hit lookup     decode the PNG + hash its pixels + find the cached encoding (no model work)
    end-to-end           PNG file -> decode -> query -> heatmap overlay (xvlm.render), new and cached image
and the memory it takes (RSS on CPU, torch.cuda allocations on GPU). Timings are medians over `--repeats` runs after
`--warmup` runs of every query, with the inter-quartile range and min / max as the spread.

Models (`--models`, comma separated):
    default   the shipped model (weights/xvlm-shapes, `Grounder.from_pretrained()`); skipped with a message if absent
    base      X-VLM base size with random weights (registry model `bench-xvlm-base`): Swin-B 384 + BERT-base 6+6,
              heads itc/itm/bbox (the released RefCOCO+ models' shape); the tokenizer is a synthetic 30522-token
              WordPiece vocab (no download)
    x2base    X²-VLM base size with random weights at the same 384 px (`bench-x2vlm-base`): BEiT-2 base (24x24
              patches of 16 px) + BERT-base 12+6, heads itc/itm/bbox; same synthetic vocab
    tiny      a tiny random model for smoke tests (`bench-tiny`)
    DIR       any folder saved by `save_pretrained`
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

MODEL_CHOICES = ("default", "base", "x2base", "tiny")
DEFAULT_MODELS = "default,base"
DEFAULT_MODEL_DIR: Path | None = None      # None: xvlm.grounder.DEFAULT_WEIGHTS (tests point it elsewhere)
BERT_BASE_VOCAB = 30522
IMAGE_SIZE = (640, 480)                    # the synthetic benchmark image (W, H), a typical photo-sized upload

# Phrases of realistic length (4-10 WordPiece tokens); follow-up queries cycle through them.
PHRASES = [
    "the red circle on the left",
    "a small blue square near the top right corner",
    "green triangle",
    "the biggest yellow star in the middle",
    "purple rectangle below the circle",
    "the orange shape at the bottom",
    "two small circles next to each other",
    "the leftmost blue thing",
    "a white square on a dark background",
    "the tiny red dot",
]

TABLE_COLUMNS = ("query", "median ms", "IQR ms (q1-q3)", "min ms", "max ms", "n")


class ModelUnavailable(RuntimeError):
    """A requested model cannot be built here (e.g. the default model before it was trained)."""


# --- statistics ----------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    label: str
    samples: list[float]                     # seconds

    def _ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.samples) * 1e3, q))

    @property
    def median(self) -> float:
        return self._ms(50)

    @property
    def q1(self) -> float:
        return self._ms(25)

    @property
    def q3(self) -> float:
        return self._ms(75)

    @property
    def min(self) -> float:
        return min(self.samples) * 1e3

    @property
    def max(self) -> float:
        return max(self.samples) * 1e3


def _fmt_ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def timing_cells(t: Timing) -> list[str]:
    return [t.label, _fmt_ms(t.median), f"{_fmt_ms(t.q3 - t.q1)} ({_fmt_ms(t.q1)}-{_fmt_ms(t.q3)})",
            _fmt_ms(t.min), _fmt_ms(t.max), str(len(t.samples))]


# --- memory ----------------------------------------------------------------------------------------------------------
def current_rss() -> int | None:
    """Resident set size of this process in bytes (/proc on Linux, psutil elsewhere if installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; Linux >= 4.0. False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS in bytes: VmHWM (since the last reset) on Linux, else getrusage's process-lifetime maximum."""
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class MemoryProbe:
    """Model memory (at load) and peak working memory of the queries, on CPU (RSS) or CUDA (torch allocator)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before_load = self._now()
        self.after_load: int | None = None
        self.peak_is_lifetime = False

    def _now(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return current_rss()

    def loaded(self) -> None:
        gc.collect()
        self.after_load = self._now()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_is_lifetime = not reset_peak_rss()

    def rows(self) -> list[tuple[str, str]]:
        mib = 2.0 ** 20
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            kind = "torch.cuda.max_memory_allocated"
        else:
            peak = peak_rss()
            kind = "RSS high-water mark (VmHWM)" if not self.peak_is_lifetime else "ru_maxrss (process lifetime)"
        rows = []
        if self.before_load is not None and self.after_load is not None:
            what = "CUDA memory allocated" if self.device.type == "cuda" else "RSS growth"
            rows.append(("memory: model loaded", f"{(self.after_load - self.before_load) / mib:.0f} MiB ({what})"))
        if self.after_load is not None:
            rows.append(("memory: peak above loaded model, during queries",
                         f"{max(peak - self.after_load, 0) / mib:.0f} MiB ({kind})"))
        rows.append(("memory: peak total", f"{peak / mib:.0f} MiB ({kind})"))
        return rows


# --- inputs ----------------------------------------------------------------------------------------------------------
def write_synthetic_vocab(directory: str | Path, size: int = BERT_BASE_VOCAB, words=PHRASES) -> Path:
    """A WordPiece vocab.txt of exactly `size` tokens (BERT-base's 30522 by default): special tokens, the words of
    `words`, single characters, then `[unusedN]` fillers. Stands in for bert-base-uncased's vocab (no download); the
    token ids differ, which does not matter for random weights or timing."""
    from .preprocess import write_wordpiece_vocab

    directory = Path(directory)
    path = write_wordpiece_vocab({w for p in words for w in p.lower().split()}, directory / "vocab.txt")
    tokens = path.read_text().splitlines()
    if len(tokens) > size:
        raise ValueError(f"the words need {len(tokens)} tokens, more than size={size}")
    tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    path.write_text("\n".join(tokens) + "\n")
    return path


def write_synthetic_image(path: str | Path, size: tuple[int, int] = IMAGE_SIZE, seed: int = 0) -> Path:
    """A photo-sized RGB PNG with shapes on a noisy background (deterministic)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    W, H = size
    base = np.linspace(40, 200, W, dtype=np.float32)[None, :, None] * np.ones((H, 1, 3), np.float32)
    arr = np.clip(base + rng.normal(0, 12, (H, W, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, W - 40)), int(rng.integers(0, H - 40))
        x1, y1 = x0 + int(rng.integers(20, W // 3)), y0 + int(rng.integers(20, H // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    path = Path(path)
    im.save(path)
    return path


# --- models ----------------------------------------------------------------------------------------------------------
def _tokenizer(vocab: Path, cfg):
    from .preprocess import Tokenizer

    return Tokenizer.for_config(vocab, cfg)


def base_grounder(device, workdir: Path):
    """X-VLM base size (Swin-B 384 + BERT-base 6+6, heads itc/itm/bbox), random weights."""
    from .grounder import Grounder
    from .registry import create_model

    torch.manual_seed(0)
    model = create_model("bench-xvlm-base")
    tok = _tokenizer(write_synthetic_vocab(workdir / "vocab-base"), model.cfg)
    return Grounder(model, tok, device=device, name="xvlm-base (random weights)")


def x2base_grounder(device, workdir: Path):
    """X²-VLM base size at 384 px (BEiT-2 base + BERT-base 12+6, heads itc/itm/bbox), random weights: the base
    pre-trained preset at the grounding resolution, beside `base_grounder`."""
    from .grounder import Grounder
    from .registry import create_model

    torch.manual_seed(0)
    model = create_model("bench-x2vlm-base")
    tok = _tokenizer(write_synthetic_vocab(workdir / "vocab-base"), model.cfg)
    return Grounder(model, tok, device=device, name="x2vlm-base 384px (random weights)")


def tiny_grounder(device, workdir: Path):
    """A tiny random model (`bench-tiny`: ViT 64px / 4x4 patches, 2-layer BERT of width 32) for smoke tests, with
    a vocabulary of the benchmark's phrases."""
    import dataclasses

    from .grounder import Grounder
    from .preprocess import write_wordpiece_vocab
    from .registry import create_model, get_model_config

    vocab = write_wordpiece_vocab({w for p in PHRASES for w in p.split()}, workdir / "vocab-tiny" / "vocab.txt")
    cfg = get_model_config("bench-tiny")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(vocab.read_text().splitlines())))
    torch.manual_seed(0)
    return Grounder(create_model(cfg), _tokenizer(vocab, cfg), device=device, name="tiny (random weights)")


def pretrained_grounder(device, path: Path | None):
    from .checkpoint import CheckpointError
    from .grounder import DEFAULT_WEIGHTS, Grounder

    path = Path(path) if path is not None else (DEFAULT_MODEL_DIR or DEFAULT_WEIGHTS)
    try:
        return Grounder.from_pretrained(path, device=device)
    except (FileNotFoundError, CheckpointError) as e:
        raise ModelUnavailable(" ".join(str(e).split())) from e


def build_grounder(name: str, device, workdir: Path):
    if name == "base":
        return base_grounder(device, workdir)
    if name == "x2base":
        return x2base_grounder(device, workdir)
    if name == "tiny":
        return tiny_grounder(device, workdir)
    if name == "default":
        return pretrained_grounder(device, None)
    return pretrained_grounder(device, Path(name))


def describe(g) -> str:
    cfg = g.model.cfg
    v, t = cfg.vision, cfg.text
    if v.kind == "swin":
        vis = f"Swin embed {v.embed_dim} depths {list(v.depths)} @ {v.image_res}px"
    elif v.kind == "beit2":
        vis = f"BEiT-2 width {v.width} depth {v.depth} @ {v.image_res}px"
    else:
        vis = f"ViT width {v.width} depth {v.depth}{', conv stem' if v.stem == 'conv' else ''} @ {v.image_res}px"
    n_params = sum(p.numel() for p in g.model.parameters())
    return (f"{vis} ({v.grid_size}x{v.grid_size} patches) + BERT width {t.hidden_size} "
            f"{t.fusion_layer}+{t.num_hidden_layers - t.fusion_layer} layers; heads {','.join(cfg.heads)}; "
            f"{n_params / 1e6:.1f}M parameters")


# --- the benchmark ---------------------------------------------------------------------------------------------------
@dataclass
class ModelReport:
    name: str
    description: str
    device: str
    threads: int
    repeats: int
    warmup: int
    image: str
    compiled: bool
    timings: list[Timing] = field(default_factory=list)
    memory: list[tuple[str, str]] = field(default_factory=list)
    ratios: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def timing(self, key: str) -> Timing:
        return next(t for t in self.timings if t.label.startswith(key))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], repeats: int, device: torch.device, before: Callable[[], object] | None = None):
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _render(pil, result) -> np.ndarray:
    from .render import draw_boxes, overlay_heatmap

    if result.patch_heatmap is not None:
        return overlay_heatmap(pil, result.patch_heatmap, mask=result.region_mask, box_xyxy=result.box_xyxy,
                               box_image_size=result.image_size, grid_xyxy=result.canvas_xyxy)
    return draw_boxes(pil, [result])


def bench_grounder(g, image_path: Path, repeats: int, warmup: int, compiled: bool = False,
                   memory: MemoryProbe | None = None) -> ModelReport:
    dev = g.device
    pil = g.image_as_seen(image_path)[0]
    report = ModelReport(g.name, describe(g), f"{_device_name(dev)}, {g.precision}", torch.get_num_threads(), repeats,
                         warmup, f"{image_path.name} {pil.size[0]}x{pil.size[1]}", compiled)
    follow = iter(range(10 ** 9))

    def next_phrase() -> str:
        return PHRASES[1 + next(follow) % (len(PHRASES) - 1)]

    def e2e():
        im = g.image_as_seen(image_path)[0]
        r = g.ground(im, next_phrase())
        _render(im, r)

    def lookup():
        g.encode_image(image_path)

    clear = g.cache.clear
    cases = [
        ("first query (uncached: preprocess + vision + text/fusion + heads + heatmap)",
         lambda: g.ground(pil, PHRASES[0]), clear),
        ("follow-up query (cached image, new phrase)", lambda: g.ground(pil, next_phrase()), None),
        ("8 phrases batched (cached image, one call)", lambda: g.ground(pil, PHRASES[:8]), None),
        ("cache-hit lookup (PNG decode + pixel hash, no model)", lookup, None),
        ("end-to-end, new image (PNG decode + query + heatmap render)", e2e, clear),
        ("end-to-end, cached image (PNG decode + query + heatmap render)", e2e, None),
    ]
    with torch.inference_mode():
        if compiled:
            t0 = time.perf_counter()
            clear()
            g.ground(pil, PHRASES[0])
            _sync(dev)
            report.notes.append(f"torch.compile: first call (compilation) took {time.perf_counter() - t0:.1f} s, "
                                "excluded from the timings")
        for _ in range(warmup):
            for _, fn, before in cases:
                if before is not None:
                    before()
                fn()
        timed_passes = cached_runs = uncached_runs = 0
        for label, fn, before in cases:
            if before is None:
                g.ground(pil, PHRASES[0])          # make sure the image is cached
            passes = g.stats["vision_passes"]
            samples = _time(fn, repeats, dev, before)
            ran = g.stats["vision_passes"] - passes
            timed_passes += ran
            if before is not None:
                uncached_runs += repeats
                if ran != repeats:
                    report.notes.append(f"WARNING: {label}: {ran} vision passes for {repeats} uncached queries")
            else:
                cached_runs += repeats
                if ran:
                    report.notes.append(f"WARNING: {label}: the vision encoder ran {ran}x on a cached image")
            report.timings.append(Timing(label, samples))
    report.notes.append(f"vision encoder passes while timing: {timed_passes} for {uncached_runs} uncached and "
                        f"{cached_runs} cached calls")
    if memory is not None:
        report.memory = memory.rows()
    first, cached, batched = report.timing("first query"), report.timing("follow-up"), report.timing("8 phrases")
    report.ratios = [
        ("cached speedup (first query / follow-up query, medians)", f"{first.median / cached.median:.1f}x"),
        ("8 phrases batched / 1 phrase cached (medians)", f"{batched.median / cached.median:.2f}x "
                                                         f"({batched.median / 8:.1f} ms per phrase)"),
    ]
    return report


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return "cpu"


# --- output ----------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no GPU"
    return (f"{cpu_model()}, {cores} cores{gpu}; python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def format_text(r: ModelReport) -> str:
    rows = [list(TABLE_COLUMNS)] + [timing_cells(t) for t in r.timings]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = [f"== {r.name} ==", f"   {r.description}",
             f"   device {r.device}; torch threads {r.threads}; {r.repeats} repeats after {r.warmup} warm-up; "
             f"image {r.image}" + ("; vision encoder torch.compile'd" if r.compiled else ""), ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    key_w = max(len(k) for k, _ in r.memory + r.ratios) if r.memory + r.ratios else 0
    lines += [f"{k.ljust(key_w)}  {v}" for k, v in r.memory + r.ratios]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def format_markdown(reports: list[ModelReport], command: str, skipped: list[str]) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"### `{command}` ({now})", "", f"Machine: {machine_line()}", ""]
    for r in reports:
        out += [f"#### {r.name}", "", f"{r.description}. Device {r.device}; torch threads {r.threads}; "
                f"{r.repeats} repeats after {r.warmup} warm-up; image {r.image}"
                + ("; vision encoder torch.compile'd" if r.compiled else "") + ".", ""]
        out.append("| " + " | ".join(TABLE_COLUMNS) + " |")
        out.append("|---|" + "---:|" * (len(TABLE_COLUMNS) - 1))
        out += ["| " + " | ".join(timing_cells(t)) + " |" for t in r.timings]
        out.append("")
        out += [f"- {k}: **{v}**" for k, v in r.ratios] + [f"- {k}: {v}" for k, v in r.memory]
        out += [f"- note: {n}" for n in r.notes]
        out.append("")
    out += [f"- skipped {s}" for s in skipped]
    return "\n".join(out).rstrip() + "\n\n"


# --- command line ----------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvlm bench",
                                description="Latency of grounding queries (uncached / cached / batched / end-to-end) "
                                            "and memory, per model.")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated: {', '.join(MODEL_CHOICES)} or a model folder (default: {DEFAULT_MODELS})")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each query (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every query first (default 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="inference precision of every model (xvlm.precision; default fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the vision encoder (compilation happens before timing)")
    p.add_argument("--image", type=Path, help="an image file to use (default: a synthetic PNG, see --image-size)")
    p.add_argument("--image-size", default=f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}", metavar="WxH",
                   help="size of the synthetic image (default %(default)s; e.g. 4000x3000 for a phone photo)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="append the tables to this Markdown file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    if not names:
        print("error: --models is empty", file=sys.stderr)
        return 2
    if a.repeats < 1 or a.warmup < 0:
        print("error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if a.threads is not None:
        if a.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(a.threads)
    if a.image is not None and not a.image.is_file():
        print(f"error: --image not found: {a.image}", file=sys.stderr)
        return 2
    try:
        image_size = tuple(int(v) for v in a.image_size.lower().split("x"))
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --image-size must be WxH, e.g. 640x480 (got {a.image_size!r})", file=sys.stderr)
        return 2
    from .grounder import pick_device

    device = torch.device(a.device) if a.device else pick_device()
    command = "python -m xvlm bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"machine: {machine_line()}")
    print(f"device: {_device_name(device)}; precision {a.precision}", flush=True)
    reports, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="xvlm-bench-") as tmp:
        tmp = Path(tmp)
        image = a.image or write_synthetic_image(tmp / "bench.png", size=image_size)
        for name in names:
            print(f"\nbuilding {name} ...", flush=True)
            probe = MemoryProbe(device)
            try:
                g = build_grounder(name, device, tmp)
            except ModelUnavailable as e:
                msg = f"{name}: {e}"
                print(f"skipped {msg}", flush=True)
                skipped.append(msg)
                continue
            if a.precision != "fp32":
                try:
                    g = type(g)(g.model, g.tokenizer, device=device, scorer=g.scorer, name=f"{g.name}, {a.precision}",
                                precision=a.precision)
                except ValueError as e:      # e.g. int8 on a GPU
                    print(f"error: {e}", file=sys.stderr)
                    return 2
            if a.compile:
                g.compile_vision()
            probe.loaded()
            report = bench_grounder(g, image, a.repeats, a.warmup, compiled=a.compile, memory=probe)
            print(format_text(report), flush=True)
            reports.append(report)
            del g
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if a.markdown is not None and reports:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        with open(a.markdown, "a") as f:
            f.write(format_markdown(reports, command, skipped))
        print(f"appended to {a.markdown}")
    if not reports:
        print("no model was benchmarked", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
