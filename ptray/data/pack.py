"""Tokenize and pack documents into rows of exactly `seq_len + 1` tokens, with no padding.

Each document is tokenized and followed by the end-of-document token; the token stream of a batch is cut into full rows.
The tail of a batch shorter than a row is dropped and counted (`num_dropped_tokens`), so tokens are accounted for:
doc tokens = packed tokens + dropped tokens. With large batches the dropped share is well under 1%. (A batch too small
to fill even one row, which only a split's last tiny block can be, yields nothing and is not counted.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from ptray.data.tokenizer import end_of_document_id, load_tokenizer


def pack_token_lists(token_lists: list[list[int]], row_len: int) -> tuple[np.ndarray, int]:
    """Concatenate token lists and cut them into rows of `row_len`;
    returns (rows [n, row_len] int32, dropped tokens)."""
    # One C-level pass over the lists (3.4x a generator expression over the tokens on 1M tokens)
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32,
                       count=sum(map(len, token_lists)))
    num_rows = len(flat) // row_len
    return flat[: num_rows * row_len].reshape(num_rows, row_len), len(flat) - num_rows * row_len


def tokenize_and_pack(batch: dict[str, np.ndarray], *, tokenizer_dir: str, seq_len: int) -> pa.Table:
    """Ray Data batch function: text documents -> packed rows plus per-batch token accounting.

    The batch's token counts ride on its first row (zero on the others), so summing the columns over all shards gives
    exact corpus totals without a second pass.
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = end_of_document_id(tokenizer)
    # The Rust tokenizer directly: batch-encodes on all of this task's threads without per-call Python overhead.
    encoded = tokenizer.backend_tokenizer.encode_batch(list(batch["text"]), add_special_tokens=False)
    token_lists = [e.ids + [eos] for e in encoded]
    rows, dropped = pack_token_lists(token_lists, seq_len + 1)
    doc_tokens = np.zeros(len(rows), dtype=np.int64)
    dropped_tokens = np.zeros(len(rows), dtype=np.int64)
    if len(rows):
        doc_tokens[0] = sum(len(ids) for ids in token_lists)
        dropped_tokens[0] = dropped
    return pa.table({
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel(), type=pa.int32()), seq_len + 1),
        "num_doc_tokens": doc_tokens,
        "num_dropped_tokens": dropped_tokens,
    })
