"""Load test of the demo's public API: concurrent gradio_client clients hammering `/ground` on a loopback server.

    python benchmarks/loadtest.py [--requests 200] [--clients 16] [--model fixture|default|DIR]
                                  [--cache-entries N] [--images N] [--seed 0] [--timeout 300]
                                  [--threads N] [--device cpu|cuda] [--markdown benchmarks/RESULTS.md] [--json OUT]

The server is the app itself (`app.ui.build_demo` + the queue settings of `app.py`), started in a child process on
127.0.0.1 with the chosen model: `fixture` (default; the small random-weight official-format model in
tests/fixtures/official-xvlm-small), `default` (the shipped weights/xvlm-shapes, when trained), or a model folder in
our format. All traffic goes to 127.0.0.1 (gradio and gradio_client telemetry are switched off).

The clients (one `gradio_client.Client` per thread) send a fixed, seeded mix of requests:
    valid       good images (PNG / JPEG / grayscale / RGBA / EXIF-rotated / animated GIF, distinct pixels so the
                encoding cache fills and evicts) with 1-3 phrases, some non-Latin or emoji
    long        a valid image with a 30-word phrase (more tokens than the shipped model's budget: a truncation note;
                official checkpoints read it whole, as the official evaluation does)
    tiny        a 1x1 image (valid)
    empty       an empty / whitespace-only phrase box               -> rejected "No phrase"
    control     a phrase of control characters only                 -> rejected "empty phrase"
    corrupt     random bytes named .png                             -> rejected "cannot read"
    truncated   half a PNG file                                     -> rejected "cannot read"
    bomb        a 100-byte PNG declaring 50000 x 50000 pixels       -> rejected "image too large" (nothing decoded)
    huge        one 5,000-character line, or over MAX_TEXT_CHARS in all -> rejected "too long" / "too much text"
    many        MAX_PHRASES+1 .. MAX_PHRASES+24 phrases (xvlm/limits.py) -> rejected "too many phrases"
    no_image    no image at all                                      -> rejected "No image"
Each request is `completed` (valid, and the JSON is sane: one result per phrase, the image size, clipped boxes
inside the image, finite scores), `rejected` (invalid, and the server answered with the expected readable message)
or `failed` (anything else: an error on a valid request, an invalid one accepted, a wrong or missing message,
a timeout, a connection error). Target: 0 failed.

The child samples its own memory (VmRSS, and VmHWM, the kernel's high-water mark, so no spike is missed between
samples) and the grounder's encoding cache (entries, bytes, its bound) every 0.2 s. The run stops by itself: a finite
list of requests, a timeout per request, a time limit for the server start, and the child exits when the parent
closes its stdin (or after --server-lifetime seconds). Exit status 0 when nothing failed and the cache stayed within
its bound, 1 otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import queue
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))           # run as a script: the client plans with xvlm.limits, the server is app/
FIXTURE = ROOT / "tests" / "fixtures" / "official-xvlm-small"
DEFAULT_WEIGHTS = ROOT / "weights" / "xvlm-shapes"      # xvlm.grounder.DEFAULT_WEIGHTS (not imported here: the
                                                        # client process stays free of torch)
LOOPBACK = "127.0.0.1"

# Environment of both processes: no telemetry, no hub, no proxy for the loopback address.
QUIET_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
             "DO_NOT_TRACK": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

PHRASES = ["the red circle", "a small blue square", "the large green triangle on the left",
           "yellow shape at the top", "the circle next to the square", "красный круг", "赤い丸", "the 🔴 circle",
           "The BIG purple rectangle, bottom-right!"]
LONG_PHRASE = " ".join(["the smallest greenish circles behind squares"] * 6)      # 30 words, > 40 word pieces

# kind -> (weight in the mix, expected outcome: "ok" or a regex the rejection message must match)
KINDS: dict[str, tuple[float, str]] = {
    "valid": (0.44, "ok"),
    "long": (0.05, "ok"),
    "tiny": (0.06, "ok"),
    "empty": (0.06, r"No phrase"),
    "control": (0.04, r"empty phrase"),
    "corrupt": (0.06, r"cannot read"),
    "truncated": (0.04, r"cannot read"),
    "bomb": (0.05, r"image too large"),
    "huge": (0.07, r"too long|too much text"),
    "many": (0.07, r"too many phrases"),
    "no_image": (0.06, r"No image"),
}


# --- inputs ------------------------------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height RGB, a tiny IDAT and IEND: a decompression bomb that
    any decoder must refuse from the header."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _scene(w: int, h: int, rng: random.Random):
    """A small synthetic scene (PIL RGB): background gradient and a few filled shapes; distinct for each seed."""
    import numpy as np
    from PIL import Image, ImageDraw

    base = np.empty((h, w, 3), np.uint8)                     # uint8 throughout: a 12 MP scene stays cheap
    base[..., 0] = np.linspace(0, 255, w).astype(np.uint8)[None, :]
    base[..., 1] = np.linspace(0, 255, h).astype(np.uint8)[:, None]
    base[..., 2] = rng.randrange(256)
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    colors = [(220, 30, 30), (30, 60, 220), (30, 180, 60), (240, 220, 40), (150, 40, 170)]
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(1, max(1, w // 3))), min(h, y0 + rng.randint(1, max(1, h // 3)))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, max(x0, x1), max(y0, y1)], fill=rng.choice(colors))
    return im


@dataclass
class ValidImage:
    path: str
    size: tuple[int, int]           # (W, H) as the model sees it (after EXIF rotation, for a model that rotates)


def reads_exif(model: str) -> bool:
    """Whether the served model applies EXIF orientation (`VisionConfig.convert == 'composite'`, read from its
    config.json; this process stays free of torch). The fixture is an official checkpoint: the official reading."""
    if model == "fixture":
        return False
    folder = DEFAULT_WEIGHTS if model == "default" else Path(model)
    vision = json.loads((folder / "config.json").read_text()).get("vision", {})
    return vision.get("convert", "official") == "composite"


def make_inputs(folder: Path, n_images: int, seed: int, big: bool, exif_rotates: bool = True) -> dict:
    """Write the request files: `n_images` distinct valid images in several formats and modes, and the bad ones.
    `exif_rotates`: the model applies EXIF orientation, so it sees the EXIF-rotated file with W and H swapped."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(640, 480), (300, 500), (1024, 768), (800, 200), (37, 611), (512, 512), (1280, 720), (96, 64)]
    valid: list[ValidImage] = []
    for i in range(n_images):
        w, h = sizes[i % len(sizes)]
        if big and i == 0:
            w, h = 4000, 3000                                   # a phone photo: 12 MP
        im = _scene(w, h, rng)
        variant = i % 6
        if variant == 0:
            path = folder / f"valid_{i}.png"
            im.save(path)
        elif variant == 1:
            path = folder / f"valid_{i}.jpg"
            im.save(path, quality=90)
        elif variant == 2:
            path = folder / f"valid_{i}_gray.png"
            im.convert("L").save(path)
        elif variant == 3:
            path = folder / f"valid_{i}_rgba.png"
            rgba = im.convert("RGBA")
            rgba.putalpha(200)
            rgba.save(path)
        elif variant == 4:                                     # EXIF Orientation 6: displayed rotated, W and H swap
            path = folder / f"valid_{i}_exif6.jpg"
            exif = Image.Exif()
            exif[0x0112] = 6
            im.save(path, quality=90, exif=exif.tobytes())
            if exif_rotates:
                w, h = h, w
        else:                                                  # animated GIF: the first frame is used
            path = folder / f"valid_{i}_anim.gif"
            im.save(path, save_all=True, append_images=[_scene(w, h, rng)], duration=100, loop=0)
        valid.append(ValidImage(str(path), (w, h)))
    tiny = folder / "tiny_1x1.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    buf = io.BytesIO()
    _scene(320, 240, rng).save(buf, "PNG")
    truncated = folder / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bomb = folder / "bomb_50000x50000.png"
    bomb.write_bytes(_png_header_only(50_000, 50_000))
    return {"valid": valid, "tiny": ValidImage(str(tiny), (1, 1)), "corrupt": str(corrupt),
            "truncated": str(truncated), "bomb": str(bomb)}


@dataclass
class Request:
    index: int
    kind: str
    image: str | None
    text: str
    expect: str                              # "ok" or a regex for the rejection message
    size: tuple[int, int] | None = None      # expected (W, H) of a valid request
    n_phrases: int = 0


def plan_requests(n: int, inputs: dict, seed: int) -> list[Request]:
    """A seeded mix of the KINDS; every kind appears at least once when n >= len(KINDS)."""
    from xvlm.limits import MAX_PHRASES, MAX_TEXT_CHARS

    rng = random.Random(seed + 1)
    kinds = list(KINDS)
    order = kinds[:n] + rng.choices(kinds, weights=[KINDS[k][0] for k in kinds], k=max(0, n - len(kinds)))
    rng.shuffle(order)
    out = []
    for i, kind in enumerate(order):
        expect = KINDS[kind][1]
        img = rng.choice(inputs["valid"])
        if kind == "valid":
            phrases = rng.sample(PHRASES, rng.randint(1, 3))
            out.append(Request(i, kind, img.path, "\n".join(phrases), expect, img.size, len(phrases)))
        elif kind == "long":
            out.append(Request(i, kind, img.path, LONG_PHRASE, expect, img.size, 1))
        elif kind == "tiny":
            out.append(Request(i, kind, inputs["tiny"].path, rng.choice(PHRASES), expect, (1, 1), 1))
        elif kind == "empty":
            out.append(Request(i, kind, img.path, rng.choice(["", "   ", "\n\n \t \n"]), expect))
        elif kind == "control":
            out.append(Request(i, kind, img.path, rng.choice(["\x00\x01\x02", "\u200b\u200b", "\x7f\x1b"]), expect))
        elif kind in ("corrupt", "truncated", "bomb"):
            out.append(Request(i, kind, inputs[kind], rng.choice(PHRASES), expect))
        elif kind == "huge":
            text = "a" * 5000 if rng.random() < 0.5 else ("the red circle " * (MAX_TEXT_CHARS // 15 + 1))
            out.append(Request(i, kind, img.path, text, expect))
        elif kind == "many":
            n_many = rng.randint(MAX_PHRASES + 1, MAX_PHRASES + 24)
            out.append(Request(i, kind, img.path, "\n".join(rng.choice(PHRASES) for _ in range(n_many)), expect))
        elif kind == "no_image":
            out.append(Request(i, kind, None, rng.choice(PHRASES), expect))
    return out


# --- checking one answer -----------------------------------------------------------------------------------------
def check_payload(req: Request, out) -> str | None:
    """None when the JSON of a valid request is sane, else what is wrong."""
    if not isinstance(out, dict) or not isinstance(out.get("results"), list):
        return f"not a grounding payload: {str(out)[:120]}"
    if len(out["results"]) != req.n_phrases:
        return f"{len(out['results'])} results for {req.n_phrases} phrases"
    W, H = req.size
    if out.get("image") != {"width": W, "height": H}:
        return f"image size {out.get('image')} != {W}x{H}"
    caps = out.get("capabilities") or {}
    for row in out["results"]:
        box = row.get("box_xyxy")
        if caps.get("box"):
            if box is None or len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
                return f"bad box {box}"
            x0, y0, x1, y1 = box
            if not (0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H):
                return f"box {box} outside the {W}x{H} image"
        if caps.get("itm") and not (isinstance(row.get("itm"), float) and 0.0 <= row["itm"] <= 1.0):
            return f"bad ITM {row.get('itm')}"
        if caps.get("itc") and not (isinstance(row.get("itc_image"), float) and -1.0001 <= row["itc_image"] <= 1.0001):
            return f"bad ITC {row.get('itc_image')}"
    return None


@dataclass
class Outcome:
    index: int
    kind: str
    status: str                 # completed | rejected | failed
    latency_s: float
    detail: str = ""
    truncated_note: bool = False


def run_one(client, req: Request, timeout: float) -> Outcome:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    t0 = time.perf_counter()
    try:
        image = handle_file(req.image) if req.image is not None else None
        job = client.submit(image, req.text, api_name="/ground")
        out = job.result(timeout=timeout)
    except AppError as e:
        dt = time.perf_counter() - t0
        msg = (getattr(e, "message", None) or str(e) or "").strip()
        if req.expect == "ok":
            return Outcome(req.index, req.kind, "failed", dt, f"valid request rejected: {msg[:200]}")
        if not msg:
            return Outcome(req.index, req.kind, "failed", dt, "rejected without a message")
        if not re.search(req.expect, msg):
            return Outcome(req.index, req.kind, "failed", dt, f"unexpected message: {msg[:200]}")
        return Outcome(req.index, req.kind, "rejected", dt, msg[:200])
    except Exception as e:   # timeouts, connection errors, client-side failures: all count as failed
        dt = time.perf_counter() - t0
        return Outcome(req.index, req.kind, "failed", dt, f"{type(e).__name__}: {str(e)[:200]}")
    dt = time.perf_counter() - t0
    if req.expect != "ok":
        return Outcome(req.index, req.kind, "failed", dt, "invalid request accepted")
    problem = check_payload(req, out)
    if problem:
        return Outcome(req.index, req.kind, "failed", dt, problem)
    truncated = any("truncated" in (r.get("notes") or {}) for r in out["results"])
    return Outcome(req.index, req.kind, "completed", dt, truncated_note=truncated)


# --- the server (child process) ----------------------------------------------------------------------------------
def _proc_status_bytes(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> tuple[int | None, int | None]:
    rss, hwm = _proc_status_bytes("VmRSS"), _proc_status_bytes("VmHWM")
    if rss is None:                                    # not Linux: the peak only
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = peak if sys.platform == "darwin" else peak * 1024
    return rss, hwm


def build_registry(model: str, device: str | None, cache_entries: int | None):
    from app.models import DEFAULT_NAME, ModelRegistry, ModelSpec
    from xvlm import Grounder
    from xvlm.grounder import DEFAULT_WEIGHTS

    kw = {}
    if device:
        kw["device"] = device
    if cache_entries:
        kw["cache_entries"] = cache_entries
    if model == "fixture":
        g = Grounder.from_official(FIXTURE / "checkpoint.pth", config=FIXTURE / "Grounding_bbox.yaml",
                                   tokenizer=FIXTURE / "vocab.txt", name="fixture (official-xvlm-small)", **kw)
        return ModelRegistry(grounders={g.name: g})
    if model == "default":
        spec = ModelSpec(name=DEFAULT_NAME, kind="pretrained", path=str(DEFAULT_WEIGHTS), kwargs=kw)
    else:
        spec = ModelSpec(name=f"{Path(model).name} (model folder)", kind="pretrained", path=str(model), kwargs=kw)
    registry = ModelRegistry([spec])
    registry.get(registry.default)            # load now: a broken model fails the start, not the first request
    return registry


def serve(args) -> int:
    """Child: the app on 127.0.0.1:PORT; prints READY, then samples memory and the cache until stdin closes."""
    os.environ.update(QUIET_ENV)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from xvlm.limits import QUEUE_CONCURRENCY, QUEUE_MAX_SIZE
    from app.ui import build_demo, launch_kwargs, limit_malloc_arenas

    limit_malloc_arenas()                                                             # as app.py does
    registry = build_registry(args.model, args.device, args.cache_entries)
    g = registry.get(registry.default)
    out_dir = Path(tempfile.mkdtemp(prefix="xvlm-loadtest-json-"))
    demo = build_demo(registry, out_dir=out_dir)
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)   # as app.py does
    demo.launch(server_name=LOOPBACK, server_port=args.port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()   # EOF: parent is done
    info = {"model": g.name, "device": str(g.device), "torch_threads": torch.get_num_threads(),
            "cache_bound": g.cache.max_entries, "cache_bytes_bound": g.cache.max_bytes,
            "queue_concurrency": QUEUE_CONCURRENCY, "queue_max_size": QUEUE_MAX_SIZE}
    print("READY " + json.dumps(info), flush=True)
    deadline = time.monotonic() + args.server_lifetime
    last_bytes = 0
    with open(args.stats, "a") as f:
        for _ in range(int(args.server_lifetime / 0.2) + 1):           # bounded: at most server_lifetime seconds
            if stop.is_set() or time.monotonic() > deadline:
                break
            rss, hwm = _rss()
            try:
                last_bytes = g.cache.nbytes
            except RuntimeError:                                      # resized while summed: keep the last value
                pass
            f.write(json.dumps({"t": time.time(), "rss": rss, "hwm": hwm, "cache_len": len(g.cache),
                                "cache_bytes": last_bytes, "vision_passes": g.stats["vision_passes"]}) + "\n")
            f.flush()
            stop.wait(0.2)
    demo.close()
    return 0


# --- the run (parent) --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Server:
    """The child process running the app; a context manager that always stops it."""

    def __init__(self, model: str, workdir: Path, cache_entries: int | None, device: str | None,
                 threads: int | None, startup_timeout: float, lifetime: float, log):
        self.port = _free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/"
        self.stats = workdir / "server-stats.jsonl"
        self.stderr_path = workdir / "server-stderr.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(self.port), "--model", model,
               "--stats", str(self.stats), "--server-lifetime", str(lifetime)]
        if cache_entries:
            cmd += ["--cache-entries", str(cache_entries)]
        if device:
            cmd += ["--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        self.cmd, self.startup_timeout, self.log = cmd, startup_timeout, log
        self.info: dict = {}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                        os.environ.get("PYTHONPATH")]))}
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, cwd=str(ROOT), env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout] and None, daemon=True).start()
        t0 = time.monotonic()
        while True:
            left = self.startup_timeout - (time.monotonic() - t0)
            if left <= 0:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server did not start within {self.startup_timeout:.0f} s" + self._tail())
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.proc.poll() is not None:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"the server exited with status {self.proc.returncode}" + self._tail())
                continue
            if line.startswith("READY "):
                self.info = json.loads(line[len("READY "):])
                self.log(f"server ready on {self.url} in {time.monotonic() - t0:.1f} s: {self.info}")
                return self

    def _tail(self) -> str:
        try:
            return "; its stderr ends with:\n" + self.stderr_path.read_text()[-3000:]
        except OSError:
            return ""

    def samples(self) -> list[dict]:
        try:
            text = self.stats.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:                              # a line being written right now
                pass
        return out

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()                    # the child's signal to stop
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()                          # only our own child, by its handle
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        finally:
            self._stderr.close()


def run_loadtest(requests: int = 200, clients: int = 16, model: str = "fixture", cache_entries: int | None = None,
                 n_images: int = 24, seed: int = 0, timeout: float = 300.0, startup_timeout: float = 600.0,
                 device: str | None = None, threads: int | None = None, big: bool = True,
                 workdir: str | Path | None = None, log=print) -> dict:
    """Start the server, send the requests from `clients` threads, stop the server; return the summary."""
    os.environ.update(QUIET_ENV)
    from gradio_client import Client

    if model == "default" and not (DEFAULT_WEIGHTS / "config.json").is_file():
        raise FileNotFoundError(f"--model default: no trained model in {DEFAULT_WEIGHTS} "
                                "(train it with `python -m xvlm train`, or use --model fixture)")
    if model not in ("fixture", "default") and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no config.json there (a model folder in our format)")
    own_tmp = tempfile.TemporaryDirectory(prefix="xvlm-loadtest-") if workdir is None else None
    work = Path(workdir) if workdir is not None else Path(own_tmp.name)
    try:
        inputs = make_inputs(work / "inputs", n_images=n_images, seed=seed, big=big, exif_rotates=reads_exif(model))
        plan = plan_requests(requests, inputs, seed)
        lifetime = startup_timeout + timeout * (requests / max(clients, 1) + 2) + 120
        with Server(model, work, cache_entries, device, threads, startup_timeout, lifetime, log) as server:
            warm = Client(server.url, verbose=False, analytics_enabled=False, download_files=False)
            t_warm = time.perf_counter()
            first = run_one(warm, Request(-1, "warmup", inputs["valid"][0].path, "the red circle", "ok",
                                          inputs["valid"][0].size, 1), timeout)
            t_warm = time.perf_counter() - t_warm
            if first.status != "completed":
                raise RuntimeError(f"warm-up request failed: {first.detail}")
            time.sleep(0.5)
            t_start = time.time()
            outcomes: list[Outcome] = []
            lock, cursor = threading.Lock(), iter(plan)

            def worker():
                try:
                    client = Client(server.url, verbose=False, analytics_enabled=False, download_files=False)
                except Exception as e:          # a client that cannot connect fails the requests it would send
                    client, err = None, f"client could not connect: {type(e).__name__}: {e}"
                while True:
                    with lock:
                        req = next(cursor, None)
                    if req is None:
                        return
                    o = run_one(client, req, timeout) if client is not None else Outcome(req.index, req.kind,
                                                                                         "failed", 0.0, err)
                    with lock:
                        outcomes.append(o)
                        done = len(outcomes)
                    if done % max(1, len(plan) // 10) == 0:
                        log(f"  {done}/{len(plan)} requests answered")

            pool = [threading.Thread(target=worker, name=f"client-{i}", daemon=True) for i in range(clients)]
            for t in pool:
                t.start()
            for t in pool:
                t.join(timeout=timeout * (len(plan) + 1))     # each request has its own timeout: this never binds
            wall = time.time() - t_start
            time.sleep(0.5)                                   # one more memory sample after the last answer
            samples = server.samples()
            info = dict(server.info)
        return summarize(plan, outcomes, samples, t_start, wall, info, clients, model, t_warm)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def summarize(plan, outcomes, samples, t_start, wall, info, clients, model, t_warm) -> dict:
    by_kind: dict[str, dict] = {}
    for kind in KINDS:
        rows = [o for o in outcomes if o.kind == kind]
        if not rows:
            continue
        lat = [o.latency_s for o in rows]
        by_kind[kind] = {"expect": "ok" if KINDS[kind][1] == "ok" else "reject", "n": len(rows),
                         "completed": sum(o.status == "completed" for o in rows),
                         "rejected": sum(o.status == "rejected" for o in rows),
                         "failed": sum(o.status == "failed" for o in rows),
                         "p50_s": _percentile(lat, 50), "p95_s": _percentile(lat, 95),
                         "truncated_notes": sum(o.truncated_note for o in rows),
                         "example": next((o.detail for o in rows if o.detail), "")}
    lat_all = [o.latency_s for o in outcomes]
    lat_ok = [o.latency_s for o in outcomes if o.status == "completed"]
    lat_rej = [o.latency_s for o in outcomes if o.status == "rejected"]
    invalid = [r for r in plan if r.expect != "ok"]
    rejected_invalid = sum(1 for o in outcomes if o.status == "rejected")
    before = [s for s in samples if s["t"] <= t_start] or samples[:1]
    during = [s for s in samples if s["t"] >= t_start] or samples[-1:]
    mid_t = t_start + wall / 2
    rss_during = [s["rss"] for s in during if s.get("rss")]
    mb = 1 / 2**20

    def at(t):
        near = [s for s in samples if s["t"] <= t and s.get("rss")]
        return near[-1]["rss"] * mb if near else float("nan")

    memory = {
        "rss_start_mb": (before[-1]["rss"] or 0) * mb if before else float("nan"),
        "rss_mid_mb": at(mid_t),
        "rss_end_mb": (samples[-1]["rss"] or 0) * mb if samples else float("nan"),
        "rss_peak_sampled_mb": max(rss_during) * mb if rss_during else float("nan"),
        "rss_high_water_mb": (samples[-1]["hwm"] or 0) * mb if samples else float("nan"),
        "samples": len(samples),
    }
    cache_bound = info.get("cache_bound")
    cache_max = max((s["cache_len"] for s in samples), default=0)
    cache = {"bound": cache_bound, "max_len": cache_max, "end_len": samples[-1]["cache_len"] if samples else None,
             "max_bytes": max((s["cache_bytes"] for s in samples), default=0),
             "bytes_bound": info.get("cache_bytes_bound"),
             "vision_passes": samples[-1]["vision_passes"] if samples else None,
             "bounded": cache_bound is not None and cache_max <= cache_bound}
    cache["distinct_images_sent"] = len({r.image for r in plan if r.expect == "ok"})
    failures = [{"index": o.index, "kind": o.kind, "detail": o.detail} for o in outcomes if o.status == "failed"]
    unanswered = len(plan) - len(outcomes)
    return {
        "model": info.get("model", model), "device": info.get("device"), "torch_threads": info.get("torch_threads"),
        "queue_concurrency": info.get("queue_concurrency"), "clients": clients, "requests": len(plan),
        "answered": len(outcomes), "completed": sum(o.status == "completed" for o in outcomes),
        "rejected": rejected_invalid, "failed": len(failures) + unanswered, "invalid_sent": len(invalid),
        "all_invalid_rejected_with_message": rejected_invalid == len(invalid) and not unanswered,
        "wall_s": wall, "throughput_rps": len(outcomes) / wall if wall > 0 else float("nan"), "warmup_s": t_warm,
        "latency": {"p50_s": _percentile(lat_all, 50), "p95_s": _percentile(lat_all, 95),
                    "completed_p50_s": _percentile(lat_ok, 50), "completed_p95_s": _percentile(lat_ok, 95),
                    "rejected_p50_s": _percentile(lat_rej, 50), "rejected_p95_s": _percentile(lat_rej, 95),
                    "max_s": max(lat_all, default=float("nan"))},
        "memory": memory, "cache": cache, "by_kind": by_kind, "failures": failures[:50],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "ok": not failures and not unanswered and cache["bounded"],
    }


# --- reporting ---------------------------------------------------------------------------------------------------
def _ms(s: float) -> str:
    return "n/a" if s is None or not math.isfinite(s) else f"{s * 1000:.0f}"


def table(res: dict) -> str:
    head = "| kind | expected | n | completed | rejected | failed | p50 ms | p95 ms |"
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|"]
    for kind, k in res["by_kind"].items():
        lines.append(f"| {kind} | {k['expect']} | {k['n']} | {k['completed']} | {k['rejected']} | {k['failed']} | "
                     f"{_ms(k['p50_s'])} | {_ms(k['p95_s'])} |")
    L = res["latency"]
    lines.append(f"| **all** | | **{res['requests']}** | **{res['completed']}** | **{res['rejected']}** | "
                 f"**{res['failed']}** | **{_ms(L['p50_s'])}** | **{_ms(L['p95_s'])}** |")
    m, c = res["memory"], res["cache"]
    lines += ["",
              f"- model `{res['model']}` on {res['device']} ({res['torch_threads']} torch threads), queue concurrency "
              f"{res['queue_concurrency']}; {res['clients']} concurrent clients; {res['machine']}",
              f"- wall {res['wall_s']:.1f} s, {res['throughput_rps']:.2f} requests/s (warm-up request "
              f"{res['warmup_s']:.1f} s, not counted); latency of completed p50 {_ms(L['completed_p50_s'])} ms / p95 "
              f"{_ms(L['completed_p95_s'])} ms, of rejected p50 {_ms(L['rejected_p50_s'])} ms / p95 "
              f"{_ms(L['rejected_p95_s'])} ms, max {_ms(L['max_s'])} ms",
              f"- every invalid request rejected with its message: "
              f"{'yes' if res['all_invalid_rejected_with_message'] else 'NO'} ({res['rejected']}/{res['invalid_sent']})",
              f"- server RSS: {m['rss_start_mb']:.0f} MiB after warm-up, {m['rss_mid_mb']:.0f} MiB at half-time, "
              f"{m['rss_end_mb']:.0f} MiB at the end; sampled peak {m['rss_peak_sampled_mb']:.0f} MiB, high-water "
              f"mark {m['rss_high_water_mb']:.0f} MiB ({m['samples']} samples, 0.2 s apart)",
              f"- encoding cache: at most {c['max_len']} entries (bound {c['bound']}; {c['end_len']} at the end), "
              f"at most {c['max_bytes'] / 2**20:.1f} MiB (bound {c['bytes_bound'] / 2**20:.0f} MiB); "
              f"{c['vision_passes']} vision passes for {c['distinct_images_sent']} distinct valid images: "
              f"{'bounded' if c['bounded'] else 'OVER ITS BOUND'}"]
    if res["failures"]:
        lines.append("- failures: " + "; ".join(f"#{f['index']} {f['kind']}: {f['detail']}" for f in res["failures"][:10]))
    return "\n".join(lines)


def append_markdown(path: Path, res: dict, command: str) -> None:
    section = (f"\n## Load test ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
               f"`{command}`: {res['clients']} concurrent `gradio_client` clients, {res['requests']} requests "
               f"through the app's `/ground` API on 127.0.0.1 (valid and invalid inputs mixed; "
               f"`benchmarks/loadtest.py` describes each kind).\n\n{table(res)}\n")
    with open(path, "a") as f:
        f.write(section)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--model", default="fixture", help="fixture (default), default (weights/xvlm-shapes), or a folder")
    p.add_argument("--cache-entries", type=int, default=None, help="the Grounder's cache bound (default: its own)")
    p.add_argument("--images", type=int, default=24, help="distinct valid images (more than the cache bound: evictions)")
    p.add_argument("--no-big", action="store_true", help="no 12-megapixel image among the valid ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    p.add_argument("--device", default=None, help="the server's device (default: cuda when available)")
    p.add_argument("--markdown", default=None, help="append a results section to this file (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--json", default=None, help="write the full summary as JSON")
    # the child process
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stats", default=None, help=argparse.SUPPRESS)
    p.add_argument("--server-lifetime", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.requests < 1 or args.clients < 1 or args.images < 1:
        p.error("--requests, --clients and --images must be >= 1")
    res = run_loadtest(requests=args.requests, clients=args.clients, model=args.model,
                       cache_entries=args.cache_entries, n_images=args.images, seed=args.seed, timeout=args.timeout,
                       startup_timeout=args.startup_timeout, device=args.device, threads=args.threads,
                       big=not args.no_big)
    print()
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.markdown:
        command = "python benchmarks/loadtest.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                              if not a.startswith("--markdown") and a != args.markdown)
        append_markdown(Path(args.markdown), res, command.strip())
        print(f"\nappended to {args.markdown}")
    print("\nRESULT:", "OK (0 failed, cache bounded)" if res["ok"] else "FAILED")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
