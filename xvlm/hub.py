"""Where a model folder comes from: a local folder, a Hugging Face Hub model repository, or the shipped default.

`resolve_model("org/name", revision=...)` returns a local folder in our format (config.json, model.safetensors,
vocab.txt; an ONNX export adds its graphs). Order:
    1. an existing local folder of that name wins (no Hub call, even when the name looks like a repo id);
    2. otherwise a repo id is fetched with `huggingface_hub.snapshot_download` into its cache (`cache_dir`, else
       HF_HUB_CACHE / HF_HOME / ~/.cache/huggingface/hub). With HF_HUB_OFFLINE=1 (these variables are read at every
       call, not only when huggingface_hub is imported) or `local_files_only=True` only the cache is read and nothing reaches the network.

The shipped default model is `weights/xvlm-shapes/` of a checkout; an installed package carries it as package data in
`xvlm/weights/xvlm-shapes/` (pyproject.toml maps weights/ there). `default_weights()` looks in both places.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MODEL_NAME = "xvlm-shapes"
# What a model repository may hold that we read; anything else (training logs, figures) is not downloaded.
MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "README.md", "onnx.json", "*.onnx", "*.onnx.data")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = ("1", "true", "yes", "on")


def default_weights() -> Path:
    """The shipped default model folder: package data when installed, weights/ of the checkout otherwise (the
    checkout's path is returned when neither exists, so that error messages name where it is expected)."""
    package = Path(__file__).resolve().parent
    installed = package / "weights" / DEFAULT_MODEL_NAME
    checkout = package.parent / "weights" / DEFAULT_MODEL_NAME
    return installed if (installed / "config.json").is_file() else checkout


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(str(name))) and ".." not in str(name)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _env_cache_dir() -> str | None:
    """HF_HUB_CACHE / HF_HOME read now (huggingface_hub reads them once, when it is imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def resolve_model(name: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                  local_files_only: bool = False, token: str | bool | None = None) -> Path:
    """A local model folder for `name`: the folder itself when it exists, else a Hub repo snapshot (see module doc)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hub repositories, but {name} is a local folder")
        return path
    if not is_repo_id(str(name)):
        raise FileNotFoundError(f"model folder not found: {name} (and it is not a Hub repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise FileNotFoundError(f"{name} is not a local folder, and huggingface_hub is not installed to fetch it "
                                "from the Hub (pip install huggingface_hub)") from e
    offline = local_files_only or hub_offline()
    cache_dir = cache_dir or _env_cache_dir()
    where = f"{name}" + (f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(str(name), revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                   allow_patterns=list(MODEL_FILES), token=token, library_name="xvlm-grounding")
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"Hub model {where} is not in the local cache"
            + (" and HF_HUB_OFFLINE is set (or local_files_only=True)" if offline else " and the Hub is unreachable")
            + f"; cache: {cache_dir or 'HF_HUB_CACHE'}") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub model {name} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"Hub model repository {name} not found (or private: log in / pass token=)") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"could not fetch Hub model {where}: {e}") from e
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"Hub repo {where} holds no model in our format (config.json missing); convert an "
                                "official checkpoint with `python -m xvlm convert` and upload that folder")
    return folder


__all__ = ["default_weights", "resolve_model", "is_repo_id", "hub_offline", "MODEL_FILES"]
