"""A gallery index on disk: one ITC vector per image (the normalised vision_proj of the image [CLS]) and a manifest.

    INDEX/manifest.json            format, the model's identity, embed_dim, the vectors file and its sha256, and per
                                   image: id, path, size (W, H), sha1 of the decoded pixels (the cache key)
    INDEX/vectors-<sha>.safetensors  "vectors" [N, D] float32, rows in manifest order
    INDEX/images/<sha1>.png        images given in memory (not as files), so re-ranking can re-encode them
    INDEX/ivf-<sha>.faiss          the approximate ITC index of those vectors (past EXACT_MAX), built on first search:
                                   a cache, rebuilt when missing, stale or unreadable

Token maps are not stored (a 12x12 grid of 256-d tokens per image is ~150x the vector): re-ranking re-encodes the top
candidates from their files. Writes are atomic (a new vectors file, then the manifest replaced by rename), so an
interrupted or failed update leaves the previous index readable and untouched. The ITC stage runs on FAISS: exact
inner product up to `EXACT_MAX` vectors, an inverted-file index (IVF) past it, with its recall against exact search
measurable by `ann_recall`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import legacy_vision_dict
from .preprocess import InputError, image_to_tensor

FORMAT = "xvlm-gallery-index"
VERSION = 1
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXACT_MAX = 50_000          # up to here a flat (exact) inner-product search is a few ms per query on one core
IVF_NPROBE = 32


class IndexError_(InputError):
    """A missing, corrupted or incompatible index: the message names the file and what is wrong."""


# --- model identity -----------------------------------------------------------------------------------------------
# XVLMConfig fields that change image or text features (what the fingerprint covers)
FEATURE_CONFIG_KEYS = ("vision", "text", "embed_dim", "max_words", "max_tokens", "punctuation", "append_sep")


def model_identity(g) -> dict:
    """Name and fingerprint of the ITC model: sha256 of the config fields that shape its features (the encoders and the
    text preprocessing, not settings such as a calibrated threshold or the search default) and of the tensors that
    place images and texts in the shared space (both projections, the patch embedding). Vectors from another model
    are not comparable."""
    m = g.itc_model
    if m is None:
        from .grounder import NO_ITC
        raise RuntimeError(f"an index needs ITC features: {NO_ITC}")
    cfg = m.cfg.to_dict() | {"vision": legacy_vision_dict(m.cfg.vision)}   # the form indexes were first built with
    h = hashlib.sha256(json.dumps({k: cfg[k] for k in FEATURE_CONFIG_KEYS}, sort_keys=True).encode())
    state = m.state_dict()
    patch = next(k for k in state if k.startswith("vision_encoder.") and state[k].dim() >= 2)
    for k in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", patch):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return {"name": g.name, "fingerprint": h.hexdigest()[:16], "embed_dim": int(m.cfg.embed_dim)}


# --- the index ----------------------------------------------------------------------------------------------------
@dataclass
class Report:
    added: list[str] = field(default_factory=list)                     # ids
    already_indexed: int = 0                                           # paths skipped because present (resume)
    duplicates: list[tuple[str, str]] = field(default_factory=list)    # (given, id of the image with those pixels)
    skipped: list[tuple[str, str]] = field(default_factory=list)       # (given, reason)

    def lines(self) -> list[str]:
        out = [f"added {len(self.added)} image(s)" + (f", {self.already_indexed} already indexed"
                                                       if self.already_indexed else "")]
        out += [f"duplicate: {a} has the same pixels as {b} (indexed once)" for a, b in self.duplicates]
        out += [f"skipped: {a}: {why}" for a, why in self.skipped]
        return out


class GalleryIndex:
    def __init__(self, root: str | Path, model: dict, vectors: np.ndarray, items: list[dict]):
        self.root = Path(root)
        self.model = model
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.items = items
        self.report = Report()
        self.vectors_sha256: str | None = None     # of the saved vectors file: names the persisted FAISS index
        self._search = None
        self._by_digest = {it["pixels_sha1"]: it["id"] for it in items}
        self._paths = {it["path"] for it in items if it["path"]}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        return [it["id"] for it in self.items]

    @property
    def paths(self) -> list[str]:
        return [self.file(i) for i in range(len(self))]

    def file(self, row: int) -> str:
        it = self.items[row]
        return it["path"] if it["path"] else str(self.root / "images" / f"{it['pixels_sha1']}.png")

    def open(self, row: int, g):
        """The image of a row, decoded from its file as `g`'s model reads it (raises InputError when the file went
        away or changed)."""
        px = g.read_image(self.file(row))
        if px.digest != self.items[row]["pixels_sha1"]:
            raise IndexError_(f"{self.file(row)} changed since it was indexed: re-index it")
        return px

    # --- persistence --------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, g, source: dict | None = None) -> "GalleryIndex":
        ident = model_identity(g)
        if source:
            ident["source"] = source        # how `python -m xvlm search` loads the model again
        return cls(root, ident, np.zeros((0, ident["embed_dim"]), np.float32), [])

    @classmethod
    def load(cls, root: str | Path) -> "GalleryIndex":
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise IndexError_(f"no gallery index in {root}: {MANIFEST} not found "
                              "(build one with `python -m xvlm index FOLDER --out INDEX`)")
        try:
            man = json.loads(mpath.read_text())
            if man.get("format") != FORMAT:
                raise ValueError(f"format is {man.get('format')!r}, not {FORMAT!r}")
            vfile, items, model = root / man["vectors_file"], man["items"], man["model"]
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise IndexError_(f"corrupted index manifest {mpath}: {e}") from e
        if man.get("version") != VERSION:
            raise IndexError_(f"{mpath}: index version {man.get('version')} is not supported (expected {VERSION})")
        if not vfile.is_file():
            raise IndexError_(f"corrupted index {root}: vectors file {vfile.name} is missing")
        data = vfile.read_bytes()
        if hashlib.sha256(data).hexdigest() != man.get("vectors_sha256"):
            raise IndexError_(f"corrupted index {root}: {vfile.name} does not match the sha256 in {MANIFEST}")
        from safetensors.numpy import load
        try:
            vectors = load(data)["vectors"]
        except Exception as e:   # safetensors raises its own error type for a malformed header
            raise IndexError_(f"corrupted index vectors {vfile}: {e}") from e
        if vectors.shape != (len(items), model.get("embed_dim")):
            raise IndexError_(f"corrupted index {root}: {vectors.shape[0]} vectors of width {vectors.shape[1]} for "
                              f"{len(items)} images of width {model.get('embed_dim')}")
        idx = cls(root, model, vectors, items)
        idx.vectors_sha256 = man["vectors_sha256"]
        return idx

    def save(self) -> None:
        """Atomically: the vectors under a new content-addressed name, then the manifest by rename."""
        from safetensors.numpy import save
        self.root.mkdir(parents=True, exist_ok=True)
        data = save({"vectors": self.vectors})
        digest = hashlib.sha256(data).hexdigest()
        vname = f"vectors-{digest[:16]}.safetensors"
        old = None
        if (self.root / MANIFEST).is_file():
            try:
                old = json.loads((self.root / MANIFEST).read_text()).get("vectors_file")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                old = None
        _atomic_write(self.root / vname, data)
        man = {"format": FORMAT, "version": VERSION, "model": self.model, "vectors_file": vname,
               "vectors_sha256": digest, "items": self.items}
        _atomic_write(self.root / MANIFEST, (json.dumps(man, indent=1) + "\n").encode())
        if old and old != vname and (self.root / old).is_file():
            (self.root / old).unlink()
        self.vectors_sha256 = digest
        for stale in self.root.glob("ivf-*.faiss"):
            if stale.name != self._ann_file().name:
                stale.unlink()

    def check_model(self, g) -> None:
        ident = model_identity(g)
        if ident["fingerprint"] != self.model.get("fingerprint"):
            raise IndexError_(f"index {self.root} was built by model {self.model.get('name')!r} (fingerprint "
                              f"{self.model.get('fingerprint')}), not by {ident['name']!r} (fingerprint "
                              f"{ident['fingerprint']}): its vectors are not comparable; re-index with this model")

    # --- adding ---------------------------------------------------------------------------------------------------
    def add(self, ids: list[str], paths: list[str | None], sizes, digests: list[str], vectors: np.ndarray) -> None:
        for i, p, s, d in zip(ids, paths, sizes, digests):
            self.items.append({"id": i, "path": p, "size": list(s), "pixels_sha1": d})
            self._by_digest[d] = i
            if p:
                self._paths.add(p)
        self.vectors = np.concatenate([self.vectors, np.asarray(vectors, np.float32).reshape(len(ids), -1)])
        self._search = None

    def has_path(self, path: str) -> bool:
        return path in self._paths

    def id_of_pixels(self, digest: str) -> str | None:
        return self._by_digest.get(digest)

    # --- search ---------------------------------------------------------------------------------------------------
    def _ann_file(self) -> Path:
        return self.root / f"ivf-{(self.vectors_sha256 or 'unsaved')[:16]}.faiss"

    @property
    def searcher(self) -> "VectorSearch":
        """Exact search up to EXACT_MAX vectors; past it the IVF index, read from INDEX/ivf-<sha>.faiss when a
        previous search built it for these very vectors (minutes to build at 1M), else built and saved there."""
        if self._search is None:
            path = self._ann_file() if self.vectors_sha256 else None
            if len(self) > EXACT_MAX and path is not None and path.is_file():
                try:
                    self._search = VectorSearch.read(path, self.vectors)
                except RuntimeError:          # unreadable cache: rebuilt below
                    self._search = None
            if self._search is None:
                self._search = VectorSearch(self.vectors)
                if not self._search.exact and path is not None and self.root.is_dir():
                    try:
                        self._search.write(path)
                    except (OSError, RuntimeError):   # a read-only index: search works, the next load rebuilds
                        pass
        return self._search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and inner products of the top-k vectors per query, best first."""
        return self.searcher.search(queries, k)

    def ann_recall(self, k: int = 10, n_queries: int = 100, seed: int = 0) -> float:
        """Recall@k of the ITC search against exact search, for queries near indexed vectors (1.0 when exact)."""
        if self.searcher.exact:
            return 1.0
        rng = np.random.default_rng(seed)
        q = self.vectors[rng.choice(len(self), size=min(n_queries, len(self)), replace=False)]
        q = q + rng.normal(scale=0.1 / np.sqrt(q.shape[1]), size=q.shape).astype(np.float32)
        return self.searcher.recall(q / np.linalg.norm(q, axis=1, keepdims=True), min(k, len(self)))


# --- FAISS ----------------------------------------------------------------------------------------------------------
class VectorSearch:
    """Inner-product top-k over normalised vectors: exact (`IndexFlatIP`) up to `exact_max` vectors, else IVF-Flat
    with ~4 sqrt(N) lists (at least 39 vectors each), trained on a sample, probing `nprobe` lists per query."""

    def __init__(self, vectors: np.ndarray, exact_max: int | None = None, nprobe: int = IVF_NPROBE,
                 nlist: int | None = None, train_size: int = 100_000, seed: int = 0):
        import faiss
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        self.exact = n <= (EXACT_MAX if exact_max is None else exact_max)
        if self.exact:
            self.index = faiss.IndexFlatIP(d)
        else:
            nlist = nlist or min(int(4 * np.sqrt(n)), max(1, n // 39))   # FAISS wants >= 39 training points a list
            self.quantizer = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(self.quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = x[rng.choice(n, size=min(n, max(train_size, 40 * nlist)), replace=False)]
            self.index.train(sample)
            self.index.nprobe = nprobe
        self.index.add(x)
        self._vectors = x

    @classmethod
    def read(cls, path: Path, vectors: np.ndarray, nprobe: int = IVF_NPROBE) -> "VectorSearch":
        """An IVF index written by `write` (FAISS raises RuntimeError on a damaged file)."""
        import faiss
        self = cls.__new__(cls)
        self.exact, self._vectors = False, np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.read_index(str(path))
        if self.index.ntotal != len(vectors) or self.index.d != vectors.shape[1]:
            raise RuntimeError(f"{path.name} holds {self.index.ntotal} vectors, the index {len(vectors)}")
        self.index.nprobe = nprobe
        return self

    def write(self, path: Path) -> None:
        import faiss
        tmp = path.with_name(f".{path.name}.tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @property
    def kind(self) -> str:
        return "exact" if self.exact else f"ivf{self.index.nlist},nprobe={self.index.nprobe}"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        sims, rows = self.index.search(q, k)
        return rows, sims

    def recall(self, queries: np.ndarray, k: int = 10) -> float:
        """Recall@k of this index against exact inner-product search (1.0 for the exact index)."""
        import faiss
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        exact = faiss.IndexFlatIP(self._vectors.shape[1])
        exact.add(self._vectors)
        _, truth = exact.search(q, k)
        _, got = self.index.search(q, k)
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got)]))


# --- building -------------------------------------------------------------------------------------------------------
def as_index(index) -> GalleryIndex:
    return index if isinstance(index, GalleryIndex) else GalleryIndex.load(index)


def open_or_create(root: str | Path, g, source: dict | None = None, allow_shards: bool = False) -> GalleryIndex:
    root = Path(root)
    if (root / MANIFEST).exists():
        idx = GalleryIndex.load(root)
        idx.check_model(g)
        return idx
    others = [p for p in root.iterdir() if not (allow_shards and p.name == "shards")] if root.is_dir() else []
    if (root.exists() and not root.is_dir()) or others:
        raise IndexError_(f"{root} exists and is not a gallery index: choose a new folder for --out")
    return GalleryIndex.create(root, g, source)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"gallery folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def encode_vectors(g, images: list) -> np.ndarray:
    """Normalised ITC image vectors [B, D] of decoded images (`Pixels`), one batched vision pass."""
    m = g.itc_model
    v = m.cfg.vision
    batch = torch.stack([image_to_tensor(px.image, v.image_res, v.resize) for px in images]).to(g.device)
    with g.inference():
        return m.image_features(m.encode_image(batch)[:, 0]).float().cpu().numpy()


def index_images(g, images, index, batch_size: int = 8, save_every: int = 256, progress: bool = False,
                 ids: list[str] | None = None, root_for_ids: str | Path | None = None,
                 source: dict | None = None) -> GalleryIndex:
    """Add `images` (paths, PIL images or arrays) to the index folder `index` (created if new) and save it. Paths
    already in the index are skipped unread (resume), images with pixels already indexed are reported once as
    duplicates, unreadable ones skipped with the reason; nothing is written if the result would be empty. Saved every
    `save_every` new images, so an interrupted run resumes. The report is `index.report`."""
    idx = index if isinstance(index, GalleryIndex) else open_or_create(index, g, source)
    idx.check_model(g)
    images = list(images)
    rep = Report()
    pending: list[tuple[str, str | None, object]] = []   # (id, path, Pixels)
    since_save = 0

    def flush():
        nonlocal pending, since_save
        if not pending:
            return
        vecs = encode_vectors(g, [px for _, _, px in pending])
        for i, path, px in pending:
            if path is None:   # kept as a file: re-ranking re-encodes from files
                dst = idx.root / "images" / f"{px.digest}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    tmp = dst.with_suffix(".tmp.png")
                    px.image.save(tmp)
                    os.replace(tmp, dst)
        idx.add([i for i, _, _ in pending], [p for _, p, _ in pending], [px.image.size for _, _, px in pending],
                [px.digest for _, _, px in pending], vecs)
        rep.added += [i for i, _, _ in pending]
        since_save += len(pending)
        pending = []
        if since_save >= save_every:
            idx.save()
            since_save = 0

    bar = _progress(len(images), progress)
    seen: dict[str, str] = {}          # pixel sha1 -> id, for images added in this call
    given_paths: set[str] = set()      # a path listed twice is handled (and reported) once
    for n, image in enumerate(images):
        bar.update(1)
        is_path = isinstance(image, (str, Path))
        path = str(Path(image).resolve()) if is_path else None
        given = str(image) if is_path else f"image {n}"
        if path is not None and path in given_paths:
            continue
        if path is not None:
            given_paths.add(path)
        if path is not None and idx.has_path(path):
            rep.already_indexed += 1
            continue
        try:
            px = g.read_image(image)
        except InputError as e:
            rep.skipped.append((given, str(e)))
            continue
        dup = idx.id_of_pixels(px.digest) or seen.get(px.digest)
        if dup is not None:
            rep.duplicates.append((given, dup))
            continue
        if ids is not None:
            item_id = ids[n]
        elif path is not None:
            item_id = _relative(path, root_for_ids)
        else:
            item_id = f"image-{px.digest[:12]}"
        seen[px.digest] = item_id
        pending.append((item_id, path, px))
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    idx.report = rep
    if len(idx) == 0:
        raise InputError("empty gallery: no readable images" + (f" ({len(rep.skipped)} unreadable: "
                                                              + "; ".join(f'{a}: {b}' for a, b in rep.skipped[:3])
                                                              + ")" if rep.skipped else ""))
    if rep.added or not (idx.root / MANIFEST).exists():
        idx.save()
    return idx


def _relative(path: str, root) -> str:
    if root is not None:
        try:
            return str(Path(path).relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return Path(path).name


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="indexing", disable=not enabled)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- sharded encoding (torchrun) -------------------------------------------------------------------------------------
def shard_dir(root: str | Path) -> Path:
    return Path(root) / "shards"


def write_shard(g, paths: list[Path], root: str | Path, rank: int, world: int, batch_size: int = 8,
                progress: bool = False, root_for_ids=None, source: dict | None = None) -> Report:
    """Rank `rank` of `world` encodes paths[rank::world] into its own shard index under INDEX/shards/; returns its
    report (duplicates within its share, unreadable files)."""
    out = shard_dir(root) / f"rank{rank:05d}-of-{world:05d}"
    mine = paths[rank::world]
    if not mine:
        return Report()
    try:
        return index_images(g, mine, out, batch_size=batch_size, progress=progress and rank == 0,
                            root_for_ids=root_for_ids, source=source).report
    except InputError as e:           # a share with no readable image: the other ranks may still have some
        return Report(skipped=[(str(p), str(e)) for p in mine])


def merge_shards(g, root: str | Path, source: dict | None = None) -> GalleryIndex:
    """Fold every shard under INDEX/shards/ into INDEX (duplicates across shards reported once), then remove them."""
    import shutil
    shards = sorted(p for p in shard_dir(root).glob("rank*") if (p / MANIFEST).is_file())
    idx = open_or_create(root, g, source, allow_shards=True)
    rep = Report()
    for s in shards:
        part = GalleryIndex.load(s)
        part.check_model(g)
        keep = []
        for row, it in enumerate(part.items):
            dup = idx.id_of_pixels(it["pixels_sha1"])
            if it["path"] and idx.has_path(it["path"]):
                rep.already_indexed += 1
            elif dup is not None:
                rep.duplicates.append((it["path"] or it["id"], dup))
            else:
                keep.append(row)
                if not it["path"]:
                    src = s / "images" / f"{it['pixels_sha1']}.png"
                    (idx.root / "images").mkdir(parents=True, exist_ok=True)
                    os.replace(src, idx.root / "images" / src.name)
        idx.add([part.items[r]["id"] for r in keep], [part.items[r]["path"] for r in keep],
                [part.items[r]["size"] for r in keep], [part.items[r]["pixels_sha1"] for r in keep],
                part.vectors[keep])
        rep.added += [part.items[r]["id"] for r in keep]
    if len(idx) == 0:
        raise InputError("empty gallery: the shards hold no images")
    idx.save()
    shutil.rmtree(shard_dir(root))
    idx.report = rep
    return idx





__all__ = ["GalleryIndex", "VectorSearch", "Report", "IndexError_", "index_images", "model_identity", "as_index",
           "list_images", "write_shard", "merge_shards", "EXACT_MAX"]
