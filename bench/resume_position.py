"""Time to the first training batch after resuming at 10%, 50% and 90% through an epoch.

    python bench/resume_position.py                       # 200k built-in documents (about 190k packed rows)
    python bench/resume_position.py data.builtin_docs=50000

ptray's reader reaches a data position by index arithmetic and reads only the row groups that hold the next rows, so
the three times should be about equal. For contrast, the same position reached the way a Ray Data stream must (read
and skip every row before it, which ptray did before its own reader) is timed on the same shards in the same run.
The rest of a resume (starting workers, DeepSpeed init, loading the checkpoint) does not depend on the position.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import ray.data

from ptray.config import load_config
from ptray.data.loader import rank_micro_batches
from ptray.data.manifest import read_manifest
from ptray.data.prepare import ensure_prepared
from ptray.pretrain import training_stream
from ptray.session import ray_session


def first_batch_ptray(manifest, root, position, cfg, rank, world_size) -> float:
    start = time.perf_counter()
    stream, reader = training_stream(cfg, manifest, root)
    batches = rank_micro_batches(stream, reader, position=position, global_batch_rows=cfg.pretrain.global_batch_size,
                                 micro_batch_rows=cfg.pretrain.micro_batch_size, rank=rank, world_size=world_size)
    next(batches)
    return time.perf_counter() - start


def first_batch_by_skipping(manifest, root, position, cfg, world_size) -> float:
    """One worker's share of a Ray Data stream, skipping the micro-batches it consumed before the checkpoint."""
    start = time.perf_counter()
    micro = cfg.pretrain.micro_batch_size
    skip = position // world_size // micro
    ds = ray.data.read_parquet(manifest.shard_paths(root, "train")).select_columns(["input_ids"])
    for i, _ in enumerate(ds.iter_batches(batch_size=micro, batch_format="numpy", prefetch_batches=2)):
        if i >= skip:
            break
    return time.perf_counter() - start


def main(overrides: list[str]) -> None:
    cfg = load_config("tiny", ["run.dir=/tmp/ptray-bench-resume", "data.builtin_docs=200000", *overrides])
    world_size = cfg.cluster.num_workers
    with ray_session(cfg):
        ensure_prepared(cfg)
        manifest = read_manifest(cfg.prepared_dir)
        rows, g = manifest.num_train_rows, cfg.pretrain.global_batch_size
        print(f"\n{rows:,} packed rows of {manifest.seq_len + 1} tokens in {len(manifest.train)} shards; "
              f"global batch {g} rows, {world_size} workers\n")
        print(f"{'position':>9} | {'ptray first batch':>18} | {'read-and-skip':>14} | ratio")
        results = {}
        first_batch_ptray(manifest, cfg.prepared_dir, 0, cfg, 0, world_size)  # warm-up: imports, page cache
        for fraction in (0.1, 0.5, 0.9):
            position = int(fraction * rows) // g * g
            # The step starts when the slowest rank has its batch; median of 7 fresh resumes (milliseconds are noisy).
            ptray_s = statistics.median(max(first_batch_ptray(manifest, cfg.prepared_dir, position, cfg, rank,
                                                              world_size)
                                            for rank in range(world_size)) for _ in range(7))
            skip_s = first_batch_by_skipping(manifest, cfg.prepared_dir, position, cfg, world_size)
            results[fraction] = ptray_s
            print(f"{fraction:>8.0%} | {ptray_s * 1e3:>15.1f} ms | {skip_s:>12.2f} s | {skip_s / ptray_s:,.0f}x")
        print(f"\nptray 90% / 10%: {results[0.9] / results[0.1]:.2f} (1.0 = position-independent)")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1:])
