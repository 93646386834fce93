"""Data preparation throughput, measured side by side in one run on the same documents and cores:

- `ptray prepare` (Ray Data: read, clean, dedup, split, train BPE, tokenize, pack, write; a corpus of at most one
  partition, 64 MiB of text, in the driver: it says so), whole and its tokenize + pack + write stage;
- a bare single-process script doing the same steps with the same functions (no Ray);
- the bare `tokenizers` batch-encode rates of the same tokenizer (all cores): encode_batch, and encode_batch_fast
  (no character offsets; what ptray calls), the ceiling for tokenize + pack.

    python bench/prepare_throughput.py                  # 200k built-in documents
    python bench/prepare_throughput.py data.builtin_docs=50000
    python bench/prepare_throughput.py data.train_files=[corpus/*.txt]
    python bench/prepare_throughput.py --rounds 3 data.builtin_docs=1000000

With --rounds N, ptray (each time in a fresh Ray session) and the bare script alternate N times and the ratios are the
medians: on a shared 2-core machine one side's run can be 10-30% slower than the same run a minute later.
"""

import contextlib
import io
import os
import re
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ptray.config import load_config
from ptray.data.clean import clean_text, doc_hash, is_validation, shuffle_key
from ptray.data.pack import encode_documents, pack_rows
from ptray.data.prepare import corpus_files, prepare
from ptray.data.stream import source_texts
from ptray.data.tokenizer import end_of_document_id, fast_tokenizer, load_tokenizer, train_bpe
from ptray.session import ray_session


def bare_prepare(cfg, files: list[str], out_dir: str) -> int:
    """`prepare`'s steps in one process, written plainly: read, clean, dedup, split, shuffle, train BPE, tokenize,
    pack, write Parquet. Returns the document tokens."""
    d = cfg.data
    seen, docs = set(), {"train": [], "val": []}
    for path in files:
        for raw in source_texts(path, d.text_field, d.txt_document):
            text = clean_text(raw, normalize_unicode=d.normalize_unicode, strip_html=d.strip_html,
                              collapse_whitespace=d.collapse_whitespace)
            if len(text) < max(d.min_chars, 1):
                continue
            h = doc_hash(text)
            if d.dedup != "none" and h in seen:
                continue
            seen.add(h)
            docs["val" if is_validation(h, d.val_fraction, cfg.run.seed) else "train"].append((h, text))
    train_bpe((text for _, text in docs["train"][: d.tokenizer_train_docs]), vocab_size=d.vocab_size,
              out_dir=f"{out_dir}/tokenizer")
    tokenizer, eos = fast_tokenizer(f"{out_dir}/tokenizer"), end_of_document_id(load_tokenizer(f"{out_dir}/tokenizer"))
    doc_tokens = 0
    for split, split_docs in docs.items():
        order = np.argsort(shuffle_key(np.array([h for h, _ in split_docs], dtype=np.int64), cfg.run.seed))
        texts = [split_docs[i][1] for i in order]
        flat = np.concatenate([encode_documents(tokenizer, texts[i: i + 2048], eos)
                               for i in range(0, len(texts), 2048)] or [np.empty(0, np.int32)])
        doc_tokens += len(flat)
        rows, _ = pack_rows(flat, d.seq_len + 1)
        os.makedirs(f"{out_dir}/{split}")
        for k, first in enumerate(range(0, len(rows), d.rows_per_shard)):
            shard = rows[first: first + d.rows_per_shard]
            pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(
                pa.array(shard.ravel(), type=pa.int32()), d.seq_len + 1)}), f"{out_dir}/{split}/{k:05d}.parquet",
                row_group_size=d.rows_per_group)
    return doc_tokens


def main(args: list[str]) -> None:
    rounds = 1
    if "--rounds" in args:
        at = args.index("--rounds")
        rounds, args = int(args[at + 1]), args[:at] + args[at + 2:]
    run_dir = tempfile.mkdtemp(prefix="ptray-bench-")
    cfg = load_config("tiny", [f"run.dir={run_dir}", "data.builtin_docs=200000", *args])
    files = corpus_files(cfg)  # the built-in corpus is generated here, outside every timing
    # Both sides save the tokenizer with transformers; whichever runs first would pay its import (0.6 s) alone.
    from transformers import PreTrainedTokenizerFast  # noqa: F401
    timings = []  # (ptray whole, ptray tokenize+pack stage, bare) seconds per round
    for round_ in range(rounds):
        printed = io.StringIO()  # prepare's closing line gives its stage times
        with ray_session(cfg), contextlib.redirect_stdout(printed):
            start = time.perf_counter()
            manifest = prepare(cfg)
            prepare_s = time.perf_counter() - start
        print(printed.getvalue(), end="")
        stage_s = float(re.search(r"tokenize\+pack ([\d.]+)s", printed.getvalue()).group(1))
        start = time.perf_counter()
        bare_tokens = bare_prepare(cfg, files, os.path.join(run_dir, f"bare{round_}"))
        timings.append((prepare_s, stage_s, time.perf_counter() - start))
        print(f"round {round_ + 1}: ptray {prepare_s:.1f}s, bare {timings[-1][2]:.1f}s: "
              f"ratio {timings[-1][2] / prepare_s:.3f}", flush=True)
    prepare_s, stage_s, bare_s = (float(np.median(column)) for column in zip(*timings))
    ratio = float(np.median([bare / whole for whole, _, bare in timings]))
    version_dir = f"{cfg.prepared_dir}/{manifest.tokenizer_dir.split('/')[0]}"
    docs = pq.read_table(f"{version_dir}/docs", columns=["text"])["text"].to_pylist()
    tokenizer = fast_tokenizer(f"{cfg.prepared_dir}/{manifest.tokenizer_dir}")
    encode_s = {name: _encode_seconds(getattr(tokenizer, name), docs)
                for name in ("encode_batch", "encode_batch_fast") if hasattr(tokenizer, name)}
    ptray_rate, bare_rate = manifest.num_doc_tokens / prepare_s, bare_tokens / bare_s
    stage_rate = manifest.num_doc_tokens / stage_s
    print(f"\n{len(docs):,} documents, {manifest.num_doc_tokens:,} tokens ({bare_tokens:,} in the bare script), "
          f"{os.cpu_count()} cores" + (f", medians of {rounds} rounds" if rounds > 1 else ""))
    print(f"ptray prepare, whole pipeline         : {ptray_rate:12,.0f} tokens/s  ({prepare_s:.1f}s)")
    print(f"bare single-process prepare           : {bare_rate:12,.0f} tokens/s  ({bare_s:.1f}s)")
    print(f"ptray tokenize + pack + write stage   : {stage_rate:12,.0f} tokens/s  ({stage_s:.1f}s)")
    for name, seconds in encode_s.items():
        print(f"bare tokenizers {name:<21} : {bare_tokens / seconds:12,.0f} tokens/s  ({seconds:.1f}s)")
    print(f"ratio whole prepare / bare prepare    : {ratio:12.3f}")
    for name, seconds in encode_s.items():
        print(f"ratio stage / bare {name:<18} : {stage_rate * seconds / bare_tokens:12.3f}")


def _encode_seconds(encode, docs: list[str]) -> float:
    """Seconds to batch-encode `docs` with the Rust tokenizer on all cores, 2,048 documents a call (ptray's batches).
    encode_batch computes character offsets as well; encode_batch_fast (tokenizers >= 0.21, what ptray calls) skips
    them."""
    start = time.perf_counter()
    for i in range(0, len(docs), 2048):
        encode(docs[i: i + 2048], add_special_tokens=False)
    return time.perf_counter() - start


if __name__ == "__main__":
    main(sys.argv[1:])
