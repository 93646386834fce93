"""Data preparation throughput: `ptray prepare` (Ray Data: read, clean, dedup, split, train BPE, tokenize, pack, write)
vs the bare `tokenizers` batch-encode rate of the same tokenizer on the same documents, in one run.

    python bench/prepare_throughput.py                  # 200k built-in documents
    python bench/prepare_throughput.py data.builtin_docs=50000
"""

import sys
import tempfile
import time

import pyarrow.parquet as pq

from ptray.config import load_config
from ptray.data.prepare import prepare
from ptray.data.tokenizer import load_tokenizer
from ptray.session import ray_session


def main(overrides: list[str]) -> None:
    run_dir = tempfile.mkdtemp(prefix="ptray-bench-")
    cfg = load_config("tiny", [f"run.dir={run_dir}", "data.builtin_docs=200000", *overrides])
    with ray_session(cfg):
        start = time.perf_counter()
        manifest = prepare(cfg)
        prepare_s = time.perf_counter() - start
    version_dir = f"{cfg.prepared_dir}/{manifest.tokenizer_dir.split('/')[0]}"
    docs = pq.read_table(f"{version_dir}/docs", columns=["text"])["text"].to_pylist()
    tokenizer = load_tokenizer(f"{cfg.prepared_dir}/{manifest.tokenizer_dir}").backend_tokenizer
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), 10_000):  # Rust encode_batch, all cores
        tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch(docs[i: i + 10_000], add_special_tokens=False))
    encode_s = time.perf_counter() - start
    ptray_rate, bare_rate = manifest.num_doc_tokens / prepare_s, tokens / encode_s
    print(f"\n{len(docs):,} documents, {manifest.num_doc_tokens:,} tokens")
    print(f"ptray prepare (whole pipeline)    : {ptray_rate:12,.0f} tokens/s  ({prepare_s:.1f}s)")
    print(f"bare tokenizers encode_batch      : {bare_rate:12,.0f} tokens/s  ({encode_s:.1f}s)")
    print(f"ratio prepare / bare encode       : {ptray_rate / bare_rate:12.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
