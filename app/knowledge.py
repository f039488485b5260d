"""What the loaded model knows and how well it measured, for the page (issue #26): its words, its measured accuracy
(the eval reports that the model card quotes), and the warning beside a phrase with words it does not know."""
from __future__ import annotations

import json
from pathlib import Path

from xvlm.vocabulary import NOTE_KEY, known_word_groups

# Reports written next to a model folder by the commands in its card (weights/README.md): the in-distribution eval
# (`python -m xvlm eval --probe --json eval.json`) and the cross-renderer eval (`... --cross-renderer 300 --cross-only
# --json eval-cross-renderer.json`). Each names its model; a report for another model is not shown.
EVAL_FILES = {"in_distribution": "eval.json", "cross_renderer": "eval-cross-renderer.json"}


def measured_accuracy(model_dir: str | Path | None) -> dict:
    """{'in_distribution': grounding rows, 'cross_renderer': its block} from the reports beside `model_dir` that name
    it (either may be missing)."""
    if model_dir is None:
        return {}
    model_dir = Path(model_dir)
    out = {}
    for key, name in EVAL_FILES.items():
        path = model_dir.parent / name
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or report.get("model") != model_dir.name:
            continue
        block = report.get("cross_renderer") if key == "cross_renderer" else report
        if isinstance(block, dict) and isinstance(block.get("grounding"), dict) and "all" in block["grounding"]:
            out[key] = block
    return out


def describe_knowledge(g, model_dir: str | Path | None = None) -> str:
    """Markdown: the words the model was trained on (or its open vocabulary), and its measured Acc@0.5."""
    groups = known_word_groups(g.model.cfg.words)
    if groups is None:
        knows = (f"**Vocabulary:** open (WordPiece, {g.tokenizer.vocab_size:,} tokens); a word that becomes [UNK] is "
                 "flagged as unknown.")
    else:
        named = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items() if k != "other")
        n_other = len(groups.get("other", []))
        knows = (f"**This model knows only these words** — {named} (and {n_other} other words: plurals, numbers, "
                 "articles). Any other word is flagged as unknown beside its phrase: the model never saw it.")
    measured = measured_accuracy(model_dir)
    if not measured:
        return knows + " **Measured accuracy:** no eval report on file for this model."
    parts = []
    if "in_distribution" in measured:
        row = measured["in_distribution"]["grounding"]["all"]
        parts.append(f"{row['acc@0.5']:.1%} of boxes right (Acc@0.5, {row['n']} expressions) on held-out scenes "
                     "drawn like its training data")
    if "cross_renderer" in measured:
        block = measured["cross_renderer"]
        row = block["grounding"]["all"]
        heads = ", ".join(f"{h} {r['acc@0.5']:.0%}" for h, r in block.get("head", {}).items() if h != "noun only")
        parts.append(f"{row['acc@0.5']:.1%} ({row['n']} expressions) on scenes drawn by an independent renderer"
                     + (f" ({heads})" if heads else ""))
    verdict = _verdict_rates(measured)
    return (knows + " **Measured accuracy (model card):** " + "; ".join(parts)
            + ". Expect wrong boxes on anything unlike those scenes, photos above all." + verdict)


def _verdict_rates(measured: dict) -> str:
    """The not-found verdict's measured rates, as a sentence ('' when no report has them)."""
    rates = []
    for key, where in (("in_distribution", "held-out scenes"), ("cross_renderer", "the independent renderer's scenes")):
        found = measured.get(key, {}).get("found") or {}
        if found.get("absent_rejected") is not None and found.get("present_kept") is not None:
            rates.append(f"{found['absent_rejected']:.0%} of absent objects called not found and "
                         f"{found['present_kept']:.0%} of present ones found on {where}")
    return f" **The 'not found' verdict:** {'; '.join(rates)}." if rates else ""


def unknown_word_warning(index: int, result) -> str | None:
    """The page's warning for a phrase with words the model does not know (None when it knows them all)."""
    words = result.notes.get(NOTE_KEY)
    if not words:
        return None
    listed = ", ".join(f"'{w}'" for w in words)
    these = "these words" if len(words) > 1 else "this word"
    return (f"⚠️ Phrase {index + 1}: the model does not know {listed} — it never saw {these} in training, so the box "
            f"cannot follow {'them' if len(words) > 1 else 'it'} and is a guess.")


__all__ = ["measured_accuracy", "describe_knowledge", "unknown_word_warning", "EVAL_FILES"]
