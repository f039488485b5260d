"""ZeroGPU (Hugging Face Spaces' shared GPUs): the GPU work of a request runs under `@spaces.GPU` when the `spaces`
package is importable (it is installed on every Space, and is itself a no-op on Spaces without ZeroGPU); elsewhere
`gpu(fn)` is `fn`. On ZeroGPU a process holds a GPU only inside such a call, so models load on "cuda" at start-up (the
`spaces` package defers the move) and skip the start-up warm-up query, which would need a GPU outside a request."""
from __future__ import annotations

import functools
import importlib
import os

DURATION_S = 60          # the most one request may hold the GPU (ZeroGPU queues long reservations behind short ones)


def _spaces():
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def gpu(fn=None, *, duration: int = DURATION_S):
    """`@gpu` / `@gpu(duration=...)`: `spaces.GPU` when `spaces` is importable, else the function unchanged."""
    if fn is None:
        return functools.partial(gpu, duration=duration)
    spaces = _spaces()
    if spaces is None:
        return fn
    return spaces.GPU(duration=duration)(fn)


def on_zerogpu() -> bool:
    """A ZeroGPU Space (the `spaces` package sets SPACES_ZERO_GPU there)."""
    return _spaces() is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


__all__ = ["gpu", "on_zerogpu", "DURATION_S"]
