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


def _global_batches(shards, *, world_size, position=0, steps=10, global_rows=16, micro_rows=4, seed=3, window=3):
    stream = RowStream(SHARD_ROWS, chunk_rows=8, seed=seed, window_chunks=window)
    per_rank = []
    for rank in range(world_size):
        batches = rank_micro_batches(stream, ShardRows(shards, ROW_LEN, cache_groups=window + 2), position=position,
                                     global_batch_rows=global_rows, micro_batch_rows=micro_rows, rank=rank,
                                     world_size=world_size)
        micro_per_step = global_rows // world_size // micro_rows
        per_rank.append([np.concatenate([rows[:, 0] for _, _, rows in itertools.islice(batches, micro_per_step)])
                         for _ in range(steps)])
    return [np.concatenate([per_rank[r][s] for r in range(world_size)]) for s in range(steps)]


def _ids(stream: RowStream, position: int, num_rows: int) -> np.ndarray:
    shards, rows = stream.rows(position, num_rows)
    return np.cumsum([0] + SHARD_ROWS)[shards] + rows


@pytest.mark.parametrize("window", [1, 3, 100])
def test_an_epoch_visits_every_row_exactly_once_in_a_seeded_order(window):
    stream = RowStream(SHARD_ROWS, chunk_rows=8, seed=0, window_chunks=window)
    total = sum(SHARD_ROWS)
    epoch0 = _ids(stream, 0, total)
    assert sorted(epoch0) == list(range(total)) and list(epoch0) != list(range(total))
    epoch1 = _ids(stream, total, total)
    assert sorted(epoch1) == list(range(total)) and list(epoch1) != list(epoch0)  # a new order each epoch
    assert list(_ids(RowStream(SHARD_ROWS, chunk_rows=8, seed=0, window_chunks=window), 0, total)) == list(epoch0)
    assert list(_ids(RowStream(SHARD_ROWS, chunk_rows=8, seed=1, window_chunks=window), 0, total)) != list(epoch0)
    across = _ids(stream, total - 5, 10)  # a read across the epoch boundary
    assert list(across) == list(epoch0[-5:]) + list(epoch1[:5])
    pieces = [_ids(stream, start, 7) for start in range(0, total, 7)]  # any split of the stream reads the same rows
    assert list(np.concatenate(pieces)[:total]) == list(epoch0)


def test_a_global_batch_mixes_rows_from_across_the_corpus():
    """The regression behind issue 11: a batch of consecutive rows of one chunk sees one stretch of text."""
    num_rows, chunk = [4096] * 4, 256
    for window, at_least, at_most in [(1, 1, 2), (64, 12, 16)]:
        stream = RowStream(num_rows, chunk_rows=chunk, seed=0, window_chunks=window)
        spans = []
        for step in range(20):
            shards, rows = stream.rows(step * 16, 16)
            spans.append(len(set(zip(shards.tolist(), (rows // chunk).tolist()))))  # distinct chunks in the batch
        assert at_least <= min(spans) and max(spans) <= at_most, (window, spans)


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
    gathered = reader.gather(np.array([3, 0, 1, 3]), np.array([49, 0, 20, 0]))  # any rows, in the order asked
    assert list(gathered[:, 0]) == [102 + 49, 0, 37 + 20, 102]
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


def test_a_mixture_keeps_its_proportions_in_any_window_and_is_reached_by_arithmetic():
    from ptray.data.loader import MixtureStream

    small = RowStream([37, 64], chunk_rows=7, seed=1, window_chunks=3)   # 101 rows: repeats 2x as fast as its share
    large = RowStream([1, 50, 300], chunk_rows=7, seed=2, window_chunks=3)
    mix = MixtureStream([small, large], first_shards=[0, 2], weights=[0.7, 0.3], block_rows=100)
    shards, rows = mix.rows(0, 3000)
    source = (shards >= 2).astype(int)
    for start in range(0, 2900, 37):  # any window of 100 rows: 70 / 30, to within a row
        assert abs(int((source[start: start + 100] == 0).sum()) - 70) <= 1
    # Each source's rows are its own stream, in order, with shards offset into the mixture's list: a source that runs
    # out starts its next epoch alone (the small one here, 2100 rows = 20+ of its epochs).
    small_shards, small_rows = small.rows(0, int((source == 0).sum()))
    assert np.array_equal(shards[source == 0], small_shards) and np.array_equal(rows[source == 0], small_rows)
    large_shards, large_rows = large.rows(0, int((source == 1).sum()))
    assert np.array_equal(shards[source == 1], large_shards + 2) and np.array_equal(rows[source == 1], large_rows)
    # Any position by arithmetic: a read split anywhere gives the same rows (what exact resume needs).
    for cut in (1, 99, 100, 1234):
        head, tail = mix.rows(0, cut), mix.rows(cut, 3000 - cut)
        assert np.array_equal(np.concatenate([head[0], tail[0]]), shards)
        assert np.array_equal(np.concatenate([head[1], tail[1]]), rows)
    assert mix.source_position(0, 3000) == int((source == 0).sum()) == 2100
    zero = MixtureStream([small, large], first_shards=[0, 2], weights=[1.0, 0.0], block_rows=100)
    assert (zero.rows(0, 500)[0] < 2).all()  # weight 0: never drawn
