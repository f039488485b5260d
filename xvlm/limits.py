"""Every limit on what one request may ask, in one place: the library (`Grounder`, the CLI) enforces the first group,
the web demo (`app/`) adds the second. What depends on the model (how many tokens of a phrase it reads) comes from
its config: `phrase_tokens`.

Change a value here and every caller, message, test and the page's text follows it.
"""
from __future__ import annotations

# --- the library: API, CLI and app alike --------------------------------------------------------------------------
# Phrases grounded in one call (`Grounder.ground`; the app's phrase box; the analysis tools batch edits and candidate
# phrases by it). One limit for API and app, 32: the phrases of a call are one padded text + fusion batch over one
# cached image encoding, so 32 costs one forward pass of batch 32 (no more vision work); the counterfactual lab
# grounds a phrase and up to 31 edits as one such batch, and `calibrate` scores up to 32 phrases per scene, so a
# lower limit would change their outputs. On the page each phrase adds a heatmap to each gallery and, with Grad-CAM
# on, one backward pass (the slow part on a CPU: the checkbox turns it off and the progress bar counts them); the
# phrase x box matrix stops printing its values past 10 phrases and the figure stops growing.
MAX_PHRASES = 32
MAX_PHRASE_CHARS = 1000          # characters of one phrase (before cleaning; the model reads far fewer: see below)
# Decoded pixels of one image: refused from the header, before decoding (decompression bombs included).
MAX_IMAGE_PIXELS = 40_000_000

# --- the web demo (app/) ------------------------------------------------------------------------------------------
# The whole phrase box, checked before it is split into lines: room for MAX_PHRASES phrases of MAX_PHRASE_CHARS and
# their line breaks, so a paste is refused as "too much text" only when no valid request could be that long.
MAX_TEXT_CHARS = MAX_PHRASES * (MAX_PHRASE_CHARS + 1)
MAX_FILE_SIZE = "25mb"           # one upload, enforced by the server (`launch(max_file_size=...)`)
QUEUE_CONCURRENCY = 2            # requests computed at the same time (`queue(default_concurrency_limit=...)`)
QUEUE_MAX_SIZE = 32              # requests waiting; more are refused by Gradio ("queue is full")
MAX_GALLERY = 64                 # images per searched gallery (each is encoded once per model)
MAX_HITS = 20                    # hits a gallery search returns (the slider's and the API's k)
MAX_RERANK = 64                  # ITC candidates a gallery search may re-rank by ITM (the slider)
MAX_CANDIDATES = 256             # candidate phrases for "what is this region" (ranked in batches of MAX_PHRASES)


# --- what a model reads of a phrase (its config decides) ----------------------------------------------------------
def phrase_tokens(cfg) -> int:
    """Word pieces (with [CLS]) grounding reads of a phrase: the model's `max_tokens`, or for official checkpoints
    (`grounding_truncation="positions"`, as the official evaluation, which does not truncate) the text encoder's
    position table. Retrieval always cuts at `max_tokens`."""
    return cfg.text.max_position_embeddings if cfg.grounding_truncation == "positions" else cfg.max_tokens


__all__ = ["MAX_PHRASES", "MAX_PHRASE_CHARS", "MAX_IMAGE_PIXELS", "MAX_TEXT_CHARS", "MAX_FILE_SIZE",
           "QUEUE_CONCURRENCY", "QUEUE_MAX_SIZE", "MAX_GALLERY", "MAX_HITS", "MAX_RERANK", "MAX_CANDIDATES",
           "phrase_tokens"]
