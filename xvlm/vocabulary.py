"""What words a model knows, and which words of a phrase it does not (issue #26: say what it does not know).

Two kinds of model:
* a closed training vocabulary (`XVLMConfig.words`, e.g. the shapes model: every word its corpus can say). Its
  WordPiece vocabulary also holds single characters, so "cat" becomes `c ##a ##t`, never [UNK]; the tokenizer cannot
  tell, so any word outside the list is unknown.
* an open (BERT) vocabulary (`words` is None): a word is unknown when WordPiece turns it into [UNK].

`Grounder.ground` lists them per phrase in `GroundingResult.notes["unknown_words"]` (absent when there are none); the
CLI, the JSON export and the app read them from there.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable

NOTE_KEY = "unknown_words"

# How the shapes corpus' words group, for saying what a closed-vocabulary model knows (xvlm.data.synthetic's grammar).
WORD_GROUPS: dict[str, tuple[str, ...]] = {
    "colours": ("red", "green", "blue", "yellow", "orange", "purple", "gray", "grey", "white", "black"),
    "shapes": ("circle", "square", "triangle", "rectangle", "shape", "object"),
    "sizes": ("small", "large", "big"),
    "positions": ("leftmost", "rightmost", "topmost", "bottommost", "top", "bottom", "left", "right"),
    "relations": ("left of", "right of", "above", "below"),
}


def unknown_words(caption: str, tokenizer, words: Collection[str] | None) -> list[str]:
    """The words of `caption` (the model's text after `pre_caption`) the model does not know, in order, once each."""
    out: list[str] = []
    for word in caption.split():
        if word in out:
            continue
        if words is not None:
            unknown = word not in words
        else:
            unknown = tokenizer.wordpiece.unk_token in tokenizer.wordpiece.tokenize(word)
        if unknown:
            out.append(word)
    return out


def note_unknown_words(results: Iterable, tokenizer, words: Collection[str] | None) -> None:
    """Set `notes["unknown_words"]` on each result whose caption has words the model does not know."""
    known = frozenset(words) if words is not None else None
    for r in results:
        missing = unknown_words(r.caption, tokenizer, known)
        if missing:
            r.notes[NOTE_KEY] = missing


def known_word_groups(words: Collection[str] | None) -> dict[str, list[str]] | None:
    """A closed vocabulary's words by kind (colours, shapes, sizes, positions, relations; the rest as 'other'), for
    telling a user what the model knows; None for an open vocabulary."""
    if words is None:
        return None
    known = set(words)
    groups = {}
    for name, members in WORD_GROUPS.items():
        hits = [m for m in members if set(m.split()) <= known]
        if hits:
            groups[name] = hits
    grouped = {w for members in groups.values() for m in members for w in m.split()}
    other = sorted(known - grouped)
    if other:
        groups["other"] = other
    return groups


__all__ = ["NOTE_KEY", "unknown_words", "note_unknown_words", "known_word_groups"]
