"""Tokenize and pack documents into rows of exactly `seq_len + 1` tokens, with no padding.

Each document is tokenized and followed by the end-of-document token; the token stream of a block of documents is cut
into full rows. The tail of a block shorter than a row is dropped and counted (`num_dropped_tokens`), so tokens are
accounted for: doc tokens = packed tokens + dropped tokens. Blocks are large (a file of up to 50,000 documents), so
the dropped share is well under 1%. (A block too small to fill even one row yields nothing and is not counted.)
"""

from __future__ import annotations

import contextlib
import itertools
import os

import numpy as np

from ptray.data.tokenizer import fast_tokenizer


def encode_documents(tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """Documents -> one int32 token stream, each document followed by `eos_id`. `tokenizer` is a Rust
    `tokenizers.Tokenizer`: it batch-encodes on all of this process's threads (without offsets where the library
    can), and the ids go into one array in a C-level pass rather than a Python loop per token."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # tokenizers >= 0.21: no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return np.insert(flat, np.cumsum(lengths), eos_id)  # an end-of-document token after each document


def pack_rows(flat: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into rows of `row_len`; returns (rows [n, row_len], the tail shorter than a row)."""
    num_rows = len(flat) // row_len
    return flat[: num_rows * row_len].reshape(num_rows, row_len), flat[num_rows * row_len:]


def tokenize_and_pack(texts, *, tokenizer_dir: str, eos_id: int, seq_len: int, docs_per_encode: int = 2048,
                      one_thread: bool = True) -> tuple[np.ndarray, int, int]:
    """A whole file of text documents -> (packed rows [n, seq_len + 1], document tokens, tokens dropped at the end).

    One call per file of up to 50,000 documents, encoding a few thousand documents per batch: 52 tasks of 2,048
    documents each (Ray Data's batching) took 8.3 s for 192k documents on 2 cores, 2 tasks of a block each 6.1 s.
    Each call encodes on one thread: Ray runs a task per core, and each on the tokenizer's own threads (one per core)
    oversubscribed the cores: 4 blocks of 192k documents in 2 processes on 2 cores took 50.0 s so, 34.3 s on one
    thread each. A file that would set the pace on one thread (`one_thread=False`) keeps the tokenizer's threads. A
    file too small to fill one row gives no rows, and its tokens are not counted.
    """
    tokenizer, texts = fast_tokenizer(tokenizer_dir), list(texts)
    with single_threaded_tokenizer() if one_thread else contextlib.nullcontext():
        flat = np.concatenate([encode_documents(tokenizer, texts[i: i + docs_per_encode], eos_id)
                               for i in range(0, len(texts), docs_per_encode)] or [np.empty(0, np.int32)])
    rows, tail = pack_rows(flat, seq_len + 1)
    return (rows, len(flat), len(tail)) if len(rows) else (rows, 0, 0)


@contextlib.contextmanager
def single_threaded_tokenizer():
    """`tokenizers` encodes batches serially while TOKENIZERS_PARALLELISM is false (it reads it at every call)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
