"""Deterministic, resumable reading of the packed token shards for pretraining.

The training stream is epoch after epoch over the training rows. An epoch takes the chunks (`chunk_rows` consecutive
rows of one shard) in a seeded random order, cuts that order into windows of `window_chunks` chunks and shuffles the
rows within each window (a new order every epoch), so each global batch mixes rows from all over the corpus
(`prepare` has also shuffled the documents before packing). Global batch `s` is rows
`[s * G, (s + 1) * G)` of that stream (G = global batch size); rank `r` of `W` takes the contiguous slice
`[r * G / W, (r + 1) * G / W)` of it, as gradient-accumulation micro-batches. Therefore:

- the sequence of global batches depends only on (seed, manifest, window, G): not on timing, prefetching, which node
  reads what, or the world size;
- the data position is one integer, the number of stream rows consumed, and reaching any position is index arithmetic
  plus reading the row groups that hold the next rows: resuming at 90% of an epoch costs what resuming at 10% does.

This replaces Ray Data's `streaming_split` for the training read only (it assigns blocks to workers dynamically, so it
is neither deterministic nor resumable mid-epoch: ray-project/ray#37633, #48224);
preparing the shards stays on Ray Data.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from ptray import storage


class RowStream:
    """Maps a position in the training stream to (shard, row) pairs; pure index arithmetic, no I/O.

    An epoch orders the chunks (`chunk_rows` consecutive rows of one shard: a Parquet row group) by a seeded
    permutation, then cuts that order into windows of `window_chunks` chunks and permutes the rows inside each window.
    So a global batch draws its rows from `window_chunks` places spread over the corpus, not from one stretch of text,
    while a reader only ever needs one window's row groups at a time.
    """

    def __init__(self, num_rows_per_shard: list[int], *, chunk_rows: int, seed: int, window_chunks: int = 1):
        starts = [(i, start) for i, n in enumerate(num_rows_per_shard) for start in range(0, n, chunk_rows)]
        self.chunk_shard = np.array([i for i, _ in starts], dtype=np.int64)
        self.chunk_start = np.array([s for _, s in starts], dtype=np.int64)
        self.chunk_len = np.minimum(chunk_rows, np.array(num_rows_per_shard)[self.chunk_shard] - self.chunk_start)
        self.num_rows = int(sum(num_rows_per_shard))
        self.seed, self.window_chunks = seed, max(1, window_chunks)
        assert self.num_rows > 0, "no training rows"

    @functools.lru_cache(maxsize=2)
    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk order, first stream offset of each window plus the epoch's end) for one epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunk_len))
        offsets = np.concatenate([[0], np.cumsum(self.chunk_len[order])])
        window_firsts = np.r_[np.arange(0, len(order), self.window_chunks), len(order)]  # chunk index of each window
        return order, offsets[window_firsts]

    @functools.lru_cache(maxsize=4)
    def window(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of every row of window `k` of `epoch`, in stream order."""
        order, _ = self.epoch_order(epoch)
        chunks = order[k * self.window_chunks: (k + 1) * self.window_chunks]
        lengths = self.chunk_len[chunks]
        shards = np.repeat(self.chunk_shard[chunks], lengths)
        # row = chunk start + index within the chunk, for all chunks at once
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        rows = np.repeat(self.chunk_start[chunks], lengths) + within
        shuffle = np.random.default_rng([self.seed, epoch, k, 1]).permutation(len(rows))
        return shards[shuffle], rows[shuffle]

    def rows(self, position: int, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of stream rows [position, position + num_rows), in stream order."""
        epoch, offset = divmod(position, self.num_rows)
        shards, rows = [], []
        while num_rows > 0:
            _, window_starts = self.epoch_order(epoch)
            k = int(np.searchsorted(window_starts, offset, side="right")) - 1
            within = offset - int(window_starts[k])
            take = min(num_rows, int(window_starts[k + 1]) - offset)
            window_shards, window_rows = self.window(epoch, k)
            shards.append(window_shards[within: within + take])
            rows.append(window_rows[within: within + take])
            offset, num_rows = offset + take, num_rows - take
            if offset == self.num_rows:
                epoch, offset = epoch + 1, 0
        return np.concatenate(shards), np.concatenate(rows)


class MixtureStream:
    """A weighted mixture of sources (data.sources), each a RowStream over its own shards, with RowStream's contract:
    position -> (shard, row) by index arithmetic alone.

    The stream is cut into blocks of `block_rows` rows; a block holds a fixed number of each source's rows (the
    weights times the block, rounded by largest remainder), spread evenly through the block (slot j of source s sits
    at (j + 1/2) / n_s of the way through). So any window of training holds the proportions to within a row or two
    per source, and source s's own position at stream position p is (p // block) * n_s + (its slots before p % block).
    A source that runs out starts its next epoch on its own: small sources repeat, as the weights ask.
    """

    def __init__(self, streams: list[RowStream], first_shards: list[int], weights: list[float],
                 block_rows: int = 1000):
        self.streams, self.first_shards = streams, np.asarray(first_shards, dtype=np.int64)
        quotas = np.asarray(weights, dtype=np.float64) / sum(weights) * block_rows
        counts = np.floor(quotas).astype(np.int64)
        counts[np.argsort(-(quotas - counts), kind="stable")[: block_rows - counts.sum()]] += 1
        self.counts = counts
        keys = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n])
        owners = np.concatenate([np.full(n, s) for s, n in enumerate(counts) if n])
        self.pattern = owners[np.argsort(keys, kind="stable")]  # which source each slot of a block belongs to
        # before[s, i]: source s's slots among the first i of a block
        self.before = np.zeros((len(streams), block_rows + 1), dtype=np.int64)
        for source in range(len(streams)):
            self.before[source, 1:] = np.cumsum(self.pattern == source)
        self.block_rows = block_rows

    def source_position(self, source: int, position: int) -> int:
        """How many of source `source`'s rows the stream holds before `position`."""
        blocks, within = divmod(position, self.block_rows)
        return blocks * int(self.counts[source]) + int(self.before[source, within])

    def rows(self, position: int, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        owners = self.pattern[np.arange(position, position + num_rows) % self.block_rows]
        shards, rows = np.empty(num_rows, dtype=np.int64), np.empty(num_rows, dtype=np.int64)
        for source, stream in enumerate(self.streams):
            first, end = self.source_position(source, position), self.source_position(source, position + num_rows)
            if end > first:  # this source's rows of the range are consecutive in its own stream
                source_shards, source_rows = stream.rows(first, end - first)
                slots = np.flatnonzero(owners == source)
                shards[slots], rows[slots] = source_shards + self.first_shards[source], source_rows
        return shards, rows


class ShardRows:
    """Reads rows of the packed Parquet shards (local or object store), a row group at a time, with a cache of
    `cache_groups` row groups: size it to the stream's window, whose rows a rank reads in random order."""

    def __init__(self, paths: list[str], row_len: int, cache_groups: int = 8):
        self.paths, self.row_len = paths, row_len
        self.files: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.cache_groups = cache_groups

    def _file(self, shard: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if shard not in self.files:
            fs, inner = storage.filesystem_for(self.paths[shard])
            parquet = pq.ParquetFile(fs.open_input_file(inner))
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
            self.files[shard] = (parquet, np.concatenate([[0], np.cumsum(sizes)]))
        return self.files[shard]

    def _group(self, shard: int, group: int) -> np.ndarray:
        key = (shard, group)
        if key not in self.cache:
            parquet, _ = self._file(shard)
            column = parquet.read_row_group(group, columns=["input_ids"])["input_ids"].combine_chunks()
            self.cache[key] = np.asarray(column.flatten()).reshape(-1, self.row_len)
            if len(self.cache) > self.cache_groups:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]

    def read(self, shard: int, first: int, end: int) -> np.ndarray:
        _, offsets = self._file(shard)
        parts = []
        group = int(np.searchsorted(offsets, first, side="right")) - 1
        while first < end:
            rows = self._group(shard, group)
            start = first - int(offsets[group])
            take = min(end - first, len(rows) - start)
            parts.append(rows[start: start + take])
            first += take
            group += 1
        return np.concatenate(parts)

    def gather(self, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows given as (shard, row) pairs, in that order."""
        out = np.empty((len(rows), self.row_len), dtype=np.int32)
        for shard in np.unique(shards):
            picked = np.flatnonzero(shards == shard)
            _, offsets = self._file(int(shard))
            groups = np.searchsorted(offsets, rows[picked], side="right") - 1
            for group in np.unique(groups):
                these = picked[groups == group]
                out[these] = self._group(int(shard), int(group))[rows[these] - offsets[group]]
        return out

    def head(self, max_rows: int) -> np.ndarray:
        """The first `max_rows` rows of the shards in order (validation rows, probe inputs)."""
        parts, total = [], 0
        for shard in range(len(self.paths)):
            end = min(int(self._file(shard)[1][-1]), max_rows - total)
            if end <= 0:
                break
            parts.append(self.read(shard, 0, end))
            total += end
        return np.concatenate(parts) if parts else np.empty((0, self.row_len), dtype=np.int32)


def rank_micro_batches(stream: RowStream, reader: ShardRows, *, position: int, global_batch_rows: int,
                       micro_batch_rows: int, rank: int, world_size: int,
                       prefetch: int = 4) -> Iterator[tuple[int, int, np.ndarray]]:
    """This rank's micro-batches from stream `position` on, each as (the data position once its optimizer step is done,
    the stream index of its first row, rows [M, row_len]).

    A background thread reads up to `prefetch` micro-batches ahead; the order is fixed by arithmetic, so prefetching
    cannot change it.
    """
    per_rank = global_batch_rows // world_size
    assert per_rank * world_size == global_batch_rows and per_rank % micro_batch_rows == 0

    def positions() -> Iterator[tuple[int, int]]:
        step_start = position
        while True:
            for micro in range(per_rank // micro_batch_rows):
                yield step_start + global_batch_rows, step_start + rank * per_rank + micro * micro_batch_rows
            step_start += global_batch_rows

    def read(first: int) -> np.ndarray:
        return reader.gather(*stream.rows(first, micro_batch_rows))

    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        try:
            for step_end, first in positions():
                item = (step_end, first, read(first))
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surface read errors (a corrupt shard) in the training loop
            ready.put(e)

    threading.Thread(target=produce, daemon=True, name=f"ptray-reader-rank{rank}").start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
