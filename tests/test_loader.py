"""The deterministic, resumable training reader (no Ray): order, rank slicing, resume, epochs, row-range reads."""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptray.data.loader import RowStream, ShardRows, rank_micro_batches

ROW_LEN = 5
SHARD_ROWS = [37, 64, 1, 50]  # uneven on purpose: chunks end at shard ends


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards whose rows hold their own global id, so every read can be checked exactly."""
    root = tmp_path_factory.mktemp("shards")
    paths, first = [], 0
    for i, n in enumerate(SHARD_ROWS):
        ids = np.arange(first, first + n, dtype=np.int32)
        rows = np.repeat(ids[:, None], ROW_LEN, axis=1)
        table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), ROW_LEN)})
        paths.append(str(root / f"s{i}.parquet"))
        pq.write_table(table, paths[-1], row_group_size=7)
        first += n
    return paths


def _global_batches(shards, *, world_size, position=0, steps=10, global_rows=16, micro_rows=4, seed=3):
    stream = RowStream(SHARD_ROWS, chunk_rows=8, seed=seed)
    per_rank = []
    for rank in range(world_size):
        batches = rank_micro_batches(stream, ShardRows(shards, ROW_LEN), position=position,
                                     global_batch_rows=global_rows, micro_batch_rows=micro_rows, rank=rank,
                                     world_size=world_size)
        micro_per_step = global_rows // world_size // micro_rows
        per_rank.append([np.concatenate([rows[:, 0] for _, _, rows in itertools.islice(batches, micro_per_step)])
                         for _ in range(steps)])
    return [np.concatenate([per_rank[r][s] for r in range(world_size)]) for s in range(steps)]


def test_an_epoch_visits_every_row_exactly_once_in_a_seeded_order():
    stream = RowStream(SHARD_ROWS, chunk_rows=8, seed=0)
    total = sum(SHARD_ROWS)
    ids = lambda pieces: np.concatenate([np.arange(sum(SHARD_ROWS[:s]) + a, sum(SHARD_ROWS[:s]) + b)
                                         for s, a, b in pieces])
    epoch0 = ids(stream.pieces(0, total))
    assert sorted(epoch0) == list(range(total)) and list(epoch0) != list(range(total))
    epoch1 = ids(stream.pieces(total, total))
    assert sorted(epoch1) == list(range(total)) and list(epoch1) != list(epoch0)  # a new order each epoch
    assert list(ids(RowStream(SHARD_ROWS, chunk_rows=8, seed=0).pieces(0, total))) == list(epoch0)
    assert list(ids(RowStream(SHARD_ROWS, chunk_rows=8, seed=1).pieces(0, total))) != list(epoch0)
    across = ids(stream.pieces(total - 5, 10))  # a read across the epoch boundary
    assert list(across) == list(epoch0[-5:]) + list(epoch1[:5])


def test_global_batches_do_not_depend_on_world_size(shards):
    one = _global_batches(shards, world_size=1)
    two = _global_batches(shards, world_size=2)
    four = _global_batches(shards, world_size=4)
    for a, b, c in zip(one, two, four):
        assert list(a) == list(b) == list(c)
    assert len({int(i) for batch in one[:9] for i in batch}) == 9 * 16  # 144 of 152 rows: no repeats in an epoch


def test_resuming_at_a_position_continues_the_same_stream(shards):
    uninterrupted = _global_batches(shards, world_size=2, steps=12)
    resumed = _global_batches(shards, world_size=2, position=7 * 16, steps=5)
    for a, b in zip(uninterrupted[7:], resumed):
        assert list(a) == list(b)
    on_other_world_size = _global_batches(shards, world_size=4, position=7 * 16, steps=5)
    for a, b in zip(uninterrupted[7:], on_other_world_size):
        assert list(a) == list(b)


def test_row_range_reads_across_row_groups_return_the_exact_rows(shards):
    reader = ShardRows(shards, ROW_LEN)
    rows = reader.read(1, 5, 30)  # shard 1 holds ids 37..100 in row groups of 7
    assert list(rows[:, 0]) == list(range(37 + 5, 37 + 30))
    assert rows.shape == (25, ROW_LEN)
    assert list(reader.head(40)[:, 0]) == list(range(40))  # across the end of shard 0 (37 rows)


def test_a_corrupt_shard_surfaces_in_the_consumer(shards, tmp_path):
    broken = str(tmp_path / "broken.parquet")
    open(broken, "wb").write(b"PAR1 not a parquet file")
    batches = rank_micro_batches(RowStream([10], chunk_rows=4, seed=0), ShardRows([broken], ROW_LEN), position=0,
                                 global_batch_rows=4, micro_batch_rows=4, rank=0, world_size=1)
    with pytest.raises(Exception, match="Parquet|parquet|magic"):
        next(batches)
