"""Document cleaning and hashing: pure functions over batches of text, applied by Ray Data in `prepare`."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

import numpy as np

# Tags of real HTML elements only (and comments, doctypes), so code and maths keep their < and >: `a < b > c`,
# `vector<int>` and `<stdio.h>` are text, not markup.
_HTML_ELEMENTS = ("a abbr address article aside audio b blockquote body br button caption center cite code col "
                  "dd del details div dl dt em embed fieldset figcaption figure font footer form h1 h2 h3 h4 h5 h6 "
                  "head header hr html i iframe img input ins kbd label li link main meta nav noscript ol option p "
                  "pre q s samp script section select small source span strike strong style sub summary sup table "
                  "tbody td textarea tfoot th thead title tr tt u ul var video wbr").split()
_TAG = re.compile(r"<!--.*?-->|<!DOCTYPE[^<>]*>|</?(?:" + "|".join(_HTML_ELEMENTS) + r")(?:\s[^<>]{0,500})?/?>",
                  re.IGNORECASE | re.DOTALL)
# Whitespace other than newlines (what `[^\S\n]` matches, spelled out: a negated class is 2.5x slower to scan).
# Only runs that change are matched: a run of two or more, or one character other than a plain space. Matching every
# single space between words made this the most expensive step of `prepare`'s cleaning.
_INLINE_SPACE = "\t\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACES = re.compile(f" [{_INLINE_SPACE}]+|[{_INLINE_SPACE.replace(' ', '')}][{_INLINE_SPACE}]*")
_BLANK_LINES = re.compile(r" ?\n[\s]*\n\s*")  # a paragraph break, however it was spaced
_LINE_BREAK = re.compile(r" ?\n ?")


def clean_text(text: str, *, normalize_unicode: bool, strip_html: bool, collapse_whitespace: bool) -> str:
    if normalize_unicode:
        text = unicodedata.normalize("NFKC", text)
    if strip_html:
        stripped = _TAG.sub(" ", text)
        if stripped != text:  # entities only where there was markup: "&para=2" in a plain-text URL stays
            text = html.unescape(stripped)
    if collapse_whitespace:  # runs of spaces and tabs -> one space; line and paragraph breaks are kept
        text = _SPACES.sub(" ", text)
        if "\n" in text:  # both patterns need one; lines read from text files have none
            text = _LINE_BREAK.sub("\n", _BLANK_LINES.sub("\n\n", text))
        text = text.strip()
    return text


def doc_hash(text: str) -> int:
    """64-bit content hash: equal documents get equal hashes, so duplicates always fall into the same split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def is_validation(hash_value: int, val_fraction: float, seed: int) -> bool:
    """Hold out a document by its hash (mixed with the seed): stable across runs, machines and file order."""
    mixed = hashlib.blake2b(hash_value.to_bytes(8, "little", signed=True), digest_size=8,
                            key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(mixed, "little") / 2**64 < val_fraction


def clean_batch(batch: dict[str, np.ndarray], *, normalize_unicode: bool, strip_html: bool,
                collapse_whitespace: bool, min_chars: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Clean a batch of documents, drop short ones, and add `doc_hash` and `split` ('train' or 'val') columns."""
    texts, hashes, splits = [], [], []
    for raw in batch["text"]:
        if raw is None:
            continue
        text = clean_text(str(raw), normalize_unicode=normalize_unicode, strip_html=strip_html,
                          collapse_whitespace=collapse_whitespace)
        if len(text) < max(min_chars, 1):
            continue
        h = doc_hash(text)
        texts.append(text)
        hashes.append(h)
        splits.append("val" if is_validation(h, val_fraction, seed) else "train")
    return {"text": np.array(texts, dtype=object), "doc_hash": np.array(hashes, dtype=np.int64),
            "split": np.array(splits, dtype=object)}


def shuffle_key(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random sort key per document (splitmix64 of its hash): sorting by it shuffles the documents the
    same way on every run, whatever the order of the files and blocks they came from."""
    with np.errstate(over="ignore"):
        z = hashes.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))).astype(np.int64)


def shuffle_order(hashes: np.ndarray, *, dedup: bool, seed: int, drop: np.ndarray | None = None) -> np.ndarray:
    """The positions of a hash partition's documents in a seeded order; with `dedup`, one of each (equal hashes share
    a partition); without the documents whose hashes are in `drop` (near-duplicates, see ptray.data.minhash)."""
    keep = np.unique(hashes, return_index=True)[1] if dedup else np.arange(len(hashes))
    if drop is not None and len(drop):
        keep = keep[~np.isin(hashes[keep], drop)]
    return keep[np.argsort(shuffle_key(hashes[keep], seed), kind="stable")]

