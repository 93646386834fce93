"""`ptray prepare`: corpus files -> clean -> dedup -> split -> tokenizer -> packed Parquet token shards + manifest.

    ptray prepare --config tiny
    ptray prepare --config tiny data.train_files=[my/corpus/*.jsonl] data.seq_len=256

Every stage is a Ray Data operator, so the corpus streams through the cluster and is never held in memory on one node.
A corpus of at most one partition (PARTITION_BYTES of text) on a one-machine cluster is prepared in the driver by the
same functions, with the same files and shards as a result: Ray Data's jobs would cost more to start than its work.
Output layout (`data.prepared_dir`, default `<run.dir>/data`; a local directory or an object-store URI such as s3://):

    v<date>-<time>-<id>/              one version per prepare run
      docs/split=train/*.parquet      cleaned, de-duplicated documents (text, doc_hash)
      docs/split=val/*.parquet
      tokenizer/                      Hugging Face tokenizer directory
      train/*.parquet                 packed rows: input_ids (fixed-size list of seq_len + 1 int32)
      val/*.parquet
    manifest.json                     written last: names the version, its shards (in order) and row counts

The same corpus and config give byte-identical shards (on a cluster of the same size): Ray Data runs with
`preserve_order`, documents are hash-partitioned into a number of blocks set by the corpus size, and the manifest
records each shard's SHA-256 and a hash over all of them.

Writing the manifest is the commit: it is one file (one object on object stores), so readers see the previous prepared
data or the new one, never a mix, and nothing needs renaming (object stores cannot rename). Older versions are
deleted after the commit; a failed prepare deletes its own version and leaves the previous data untouched.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import math
import os
import re
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from ptray import storage
from ptray.config import Config, source_names
from ptray.data.builtin import write_builtin_corpus
from ptray.data.clean import clean_batch, shuffle_order
from ptray.data.manifest import Manifest, Shard, read_manifest, write_manifest
from ptray.data.minhash import near_duplicates
from ptray.data.pack import single_threaded_tokenizer, tokenize_and_pack
from ptray.data.readers import check_records, corpus_pieces, expand_files, piece_texts
from ptray.data.tokenizer import copy_tokenizer, end_of_document_id, load_tokenizer, tokenizer_hash, train_bpe
from ptray.errors import ConfigError, DataError

BUILTIN = "builtin"
PARTITION_BYTES = 64 << 20  # raw corpus text per hash partition of the documents (one gathering task each)
DOCS_PER_FILE = 50_000  # cleaned documents per file: the packing tasks' unit
IN_DRIVER = True  # a corpus of one partition, on one machine, is prepared in this process (see prepare)
DOCS_SCHEMA = pa.schema([("text", pa.string()), ("doc_hash", pa.int64()), ("split", pa.string())])


@dataclasses.dataclass
class CorpusPart:
    """The whole corpus, or one source of a mixture (data.sources): its files, and where its documents go."""
    name: str
    files: list[str]
    weight: float = 1.0
    docs: str = "docs"
    num_docs: dict = dataclasses.field(default_factory=dict)


def corpus_parts(cfg: Config) -> list[CorpusPart]:
    if not cfg.data.sources:
        return [CorpusPart(name="", files=corpus_files(cfg))]
    return [CorpusPart(name=name, files=expand_files(source["files"], f"data.sources[{i}].files"),
                       weight=float(source.get("weight", 1.0)), docs=f"docs/{name}")
            for i, (name, source) in enumerate(zip(source_names(cfg.data.sources), cfg.data.sources))]


def corpus_files(cfg: Config) -> list[str]:
    """The corpus files a config names; `builtin` writes the generated corpus under `<run.dir>/corpus` first."""
    files = []
    patterns = [p for p in cfg.data.train_files if p != BUILTIN]
    if BUILTIN in cfg.data.train_files:
        files += write_builtin_corpus(os.path.join(cfg.run_dir, "corpus"), cfg.data.builtin_docs, seed=cfg.run.seed)
    if patterns:
        files += expand_files(patterns)
    return files


def prepare(cfg: Config) -> Manifest:
    """Run the whole preparation pipeline (Ray must be initialized) and return the committed manifest."""
    started = time.perf_counter()
    out_dir = storage.absolute(cfg.prepared_dir)
    storage.check_writable(out_dir, "data.prepared_dir")
    version = time.strftime("v%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    root = storage.join(out_dir, version)
    parts = corpus_parts(cfg)
    files = [f for part in parts for f in part.files]
    print(f"[prepare] {len(files)} corpus files{f' in {len(parts)} sources' if cfg.data.sources else ''} -> {root}",
          flush=True)
    stage_s = {}  # wall time per stage, printed at the end
    context = ray.data.DataContext.get_current()
    execution = context.execution_options
    preserve_order, execution.preserve_order = execution.preserve_order, True  # else blocks finish in any order
    # Ray Data reserves a share of the CPUs for each operator of a job; on a small cluster that left the reading
    # operator one task at a time. Prepare's jobs have the cluster to themselves, and end in a barrier (a write).
    reservation, context.op_resource_reservation_enabled = context.op_resource_reservation_enabled, False
    limits, strategy = execution.resource_limits, context.scheduling_strategy
    if cores := _cores_of_one_machine_cluster():
        execution.resource_limits = limits.copy(cpu=min(limits.cpu, cores))
        _schedule_tasks(context, "DEFAULT")
    try:
        d = cfg.data
        # A corpus that fits one partition on one machine is prepared in this process, by the same functions: the
        # Ray Data jobs' fixed cost (task processes, Ray Data's own actors; about 2.5 s of 2 cores) exceeds the work.
        scan_here = IN_DRIVER and cores is not None and storage.total_size(files) <= PARTITION_BYTES
        corpus_bytes = [check_records(part.files, d.text_field, d.max_bad_fraction, max_tasks=cores,
                                      txt_document=d.txt_document, in_driver=scan_here) for part in parts]
        in_driver = scan_here and sum(corpus_bytes) <= PARTITION_BYTES and d.dedup != "minhash"
        if in_driver:
            print(f"[prepare] {sum(corpus_bytes) / 2**20:.1f} MiB of text: prepared in this process (Ray Data jobs "
                  f"run a corpus over {PARTITION_BYTES >> 20} MiB, or one on several machines)", flush=True)
        num_docs, num_near = {"train": 0, "val": 0}, 0
        for part, part_bytes in zip(parts, corpus_bytes):
            part.num_docs, near = _write_clean_docs(cfg, part.files, storage.join(root, part.docs), part_bytes,
                                                    in_driver)
            num_near += near
            num_docs = {split: num_docs[split] + part.num_docs[split] for split in num_docs}
            if part.num_docs["train"] == 0:
                raise DataError(
                    f"the corpus{f' source {part.name!r}' if part.name else ''} ({len(part.files)} files, e.g. "
                    f"{part.files[0]}) has no documents left after cleaning (data.min_chars={cfg.data.min_chars}). "
                    f"Check that the files are not empty and that data.text_field={cfg.data.text_field!r} names the "
                    "text, or lower data.min_chars.")
        stage_s["clean+dedup"] = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as local_tokenizer:
            if cfg.data.tokenizer_path:
                copy_tokenizer(cfg.data.tokenizer_path, local_tokenizer)
            else:  # an equal share of the training documents of every source
                share = math.ceil(cfg.data.tokenizer_train_docs / len(parts))
                texts = itertools.chain.from_iterable(
                    _iter_texts(storage.join(root, part.docs, "split=train"), share) for part in parts)
                train_bpe(texts, vocab_size=cfg.data.vocab_size, out_dir=local_tokenizer)
            tokenizer = load_tokenizer(local_tokenizer)
            vocab_hash = tokenizer_hash(local_tokenizer)
            tokenizer_dir = storage.join(root, "tokenizer")
            storage.copy_dir(local_tokenizer, tokenizer_dir)  # where packing tasks on every node load it from
        stage_s["tokenizer"] = time.perf_counter() - started - sum(stage_s.values())
        # Every split of every source packs in one Ray Data job (a job per split started 0.3-1 s apart).
        splits = [(storage.join(part.docs, f"split={split}"), _packed_dir(part, split))
                  for part in parts for split in ("train", "val")]
        packed, doc_tokens, dropped = _write_packed(cfg, out_dir, version, splits, tokenizer_dir,
                                                    end_of_document_id(tokenizer), in_driver)
        shards, sources = {"train": [], "val": []}, []
        for part in parts:
            for split in ("train", "val"):
                shards[split] += packed[_packed_dir(part, split)]
            if part.name:
                part_shards = packed[_packed_dir(part, "train")]
                sources.append({"name": part.name, "weight": part.weight, "files": part.files,
                                "train_shards": [len(shards["train"]) - len(part_shards), len(shards["train"])],
                                "num_docs": part.num_docs, "num_train_tokens": sum(s.num_tokens for s in part_shards)})
        if not shards["train"] or any(first == end for first, end in (s["train_shards"] for s in sources)):
            raise DataError(f"the corpus{' (a source of it)' if sources else ''} is too small to fill one row of "
                            f"data.seq_len + 1 = {cfg.data.seq_len + 1} tokens; add text or lower data.seq_len.")
        stage_s["tokenize+pack"] = time.perf_counter() - started - sum(stage_s.values())
        manifest = Manifest(
            seq_len=cfg.data.seq_len, vocab_size=len(tokenizer), tokenizer_hash=vocab_hash,
            eos_id=end_of_document_id(tokenizer), pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id,
            source_files=files, train=shards["train"], val=shards["val"], num_docs=num_docs,
            num_doc_tokens=doc_tokens, num_dropped_tokens=dropped, tokenizer_dir=f"{version}/tokenizer",
            num_near_duplicates=num_near, sources=sources,
            rows_per_group=rows_per_group(cfg), settings=prepare_settings(cfg),
            content_hash=hashlib.sha256("".join(s.sha256 for s in shards["train"] + shards["val"]).encode())
            .hexdigest())
        write_manifest(manifest, out_dir)  # the commit
    except BaseException:
        storage.delete_dir(root)
        raise
    finally:
        execution.preserve_order, execution.resource_limits = preserve_order, limits
        _schedule_tasks(context, strategy)
        context.op_resource_reservation_enabled = reservation
    for old in _versions(out_dir) - {version}:
        storage.delete_dir(storage.join(out_dir, old))
    elapsed = time.perf_counter() - started
    print(f"[prepare] {num_docs['train']} train / {num_docs['val']} val docs, {manifest.num_train_rows} train rows "
          f"of {cfg.data.seq_len + 1} tokens, vocab {manifest.vocab_size}, "
          + (f"{num_near:,} near-duplicates dropped, " if cfg.data.dedup == "minhash" else "")
          + f"{elapsed:.1f}s ({doc_tokens / elapsed:,.0f} tokens/s; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in stage_s.items()) + ")",
          flush=True)
    return manifest


def _packed_dir(part: CorpusPart, split: str) -> str:
    """Where a split's packed rows go in a version: `train/`, or `train/<source>/` for a source of a mixture."""
    return f"{split}/{part.name}" if part.name else split


def _cores_of_one_machine_cluster() -> int | None:
    """This machine's cores when the Ray cluster is this one machine, else None. Local mode advertises more logical
    CPUs than there are cores (room for Train workers beside Ray Data); preparing, every task is CPU-bound, and more of
    them than cores only adds switching: on 2 cores, 5 concurrent tokenize tasks made the stage 1.5x slower."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == ray.util.get_node_ip_address():
        return os.cpu_count()
    return None


def _schedule_tasks(context: ray.data.DataContext, strategy: str) -> None:
    """Set Ray Data's task placement. It spreads tasks over the nodes (SPREAD), which on one machine only delays each:
    a core stood idle 0.19 s between one task and the next, 0.03 s with Ray's default placement (5% of a packing
    task). Ray 2.60 deprecates the setting (its own scheduling is to decide); without it prepare is that much slower."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.scheduling_strategy = strategy


def rows_per_group(cfg: Config) -> int:
    return min(cfg.data.rows_per_group, cfg.data.rows_per_shard)  # a row group cannot exceed its file


def _versions(out_dir: str) -> set[str]:
    """The version directories `prepare` has written under `out_dir` (committed or abandoned)."""
    return {n for n in storage.list_dirs(out_dir) if re.fullmatch(r"v\d{8}-\d{6}-[0-9a-f]{6}", n)}


# What decides the prepared rows (the reader-side data.shuffle_window_rows and data.max_bad_fraction do not).
PREPARE_KEYS = ("train_files", "sources", "text_field", "txt_document", "normalize_unicode", "strip_html",
                "collapse_whitespace", "min_chars", "dedup", "minhash_threshold", "minhash_shingle",
                "minhash_permutations", "val_fraction", "seq_len", "tokenizer_path", "vocab_size",
                "tokenizer_train_docs", "rows_per_shard", "rows_per_group", "builtin_docs")


def prepare_settings(cfg: Config) -> dict:
    settings = {f"data.{key}": getattr(cfg.data, key) for key in PREPARE_KEYS}
    settings["data.train_files"] = [f if f == "builtin" else storage.absolute(f) for f in cfg.data.train_files]
    settings["data.tokenizer_path"] = storage.absolute(cfg.data.tokenizer_path)
    settings["data.sources"] = [{**source, "files": [storage.absolute(f) for f in source["files"]]}
                                for source in cfg.data.sources]
    if cfg.data.train_files != ["builtin"]:
        del settings["data.builtin_docs"]
    if cfg.data.dedup != "minhash":
        for key in ("data.minhash_threshold", "data.minhash_shingle", "data.minhash_permutations"):
            del settings[key]
    return {**settings, "run.seed": cfg.run.seed}


def ensure_prepared(cfg: Config) -> Manifest:
    """The prepared data for `cfg`, preparing it first if there is none.

    The run's own data (run.dir/data) must have been prepared with this config's data settings: a rerun with another
    corpus, vocabulary or cleaning would otherwise train on the old data under a config that says otherwise. Data named
    by data.prepared_dir is used as it was prepared (a difference is printed)."""
    if storage.exists(storage.join(cfg.prepared_dir, "manifest.json")):
        manifest = read_manifest(cfg.prepared_dir)
        wanted = prepare_settings(cfg)
        changed = [f"{key} {manifest.settings[key]!r} -> {value!r}" for key, value in wanted.items()
                   if key in manifest.settings and manifest.settings[key] != value]
        own_data = storage.absolute(cfg.prepared_dir) == storage.absolute(os.path.join(cfg.run_dir, "data"))
        if changed and not own_data:
            print(f"[prepare] note: the data in {cfg.prepared_dir} was prepared with other settings "
                  f"({'; '.join(changed)}); training uses it as prepared", flush=True)
        elif changed:
            raise ConfigError(
                f"the prepared data in {cfg.prepared_dir} was made with other settings: {'; '.join(changed)}. Restore "
                "them, use another run.dir (or run.name) for a run on other data, or run `ptray prepare` with this "
                "config to replace the data (its checkpoints will then refuse to resume).")
        return manifest
    print(f"[prepare] no prepared data at {cfg.prepared_dir}; preparing it now", flush=True)
    return prepare(cfg)


def _write_clean_docs(cfg: Config, files: list[str], docs_dir: str, corpus_bytes: int,
                      in_driver: bool) -> tuple[dict[str, int], int]:
    """Clean, deduplicate and shuffle the corpus (`corpus_bytes` of text, checked) into `docs_dir`, in a Ray Data job
    or `in_driver`; returns (documents per split, near-duplicates dropped)."""
    d = cfg.data
    cores = _cores_of_one_machine_cluster()
    pieces = corpus_pieces(files, txt_document=d.txt_document)
    # Hash-partition by content: equal documents land in the same bucket (for dedup), and every bucket is a uniform
    # sample of the whole corpus. Sorting each bucket by a seeded key then shuffles the documents before packing, the
    # same way on every run, so packed rows mix the corpus instead of following one file or book. The number of buckets
    # follows the corpus size (about 64 MiB of raw text each), not the cluster, so the order is the same everywhere.
    num_buckets = min(1024, math.ceil(corpus_bytes / PARTITION_BYTES) or 1)
    clean = dict(text_field=d.text_field, txt_document=d.txt_document, normalize_unicode=d.normalize_unicode,
                 strip_html=d.strip_html, collapse_whitespace=d.collapse_whitespace, min_chars=d.min_chars,
                 val_fraction=d.val_fraction, seed=cfg.run.seed, num_buckets=num_buckets)
    if in_driver:  # one partition: the Ray Data job's steps below, in the same order, with its file layout
        assert num_buckets == 1 and d.dedup != "minhash"
        tables = [t for piece in pieces for t in _read_and_clean({k: [v] for k, v in piece.items()}, **clean)]
        docs = _dedup_and_shuffle(pa.concat_tables(tables) if tables else DOCS_SCHEMA.empty_table(),
                                  dedup=d.dedup != "none", seed=cfg.run.seed)
        for split in ("train", "val"):
            chosen = docs.filter(pc.equal(docs["split"], split)).drop_columns("split")
            for k, first in enumerate(range(0, chosen.num_rows, DOCS_PER_FILE)):
                _write_parquet(storage.join(docs_dir, f"split={split}", f"{k:05d}.parquet"),
                               chosen.slice(first, DOCS_PER_FILE))
        return _num_docs(docs_dir), 0
    # On one machine, a task per core: each task beyond Ray's idle workers starts a process (a second of CPU).
    tasks = ray.data.TaskPoolStrategy(size=cores and min(cores, len(pieces)))  # more than inputs: Ray Data warns
    cleaned = ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(  # lazy: each use reads anew
        _read_and_clean, batch_format="numpy", batch_size=1, compute=tasks, fn_kwargs=clean)

    near = None
    if d.dedup == "minhash":  # a pass of its own over the cleaned corpus, before the split (see ptray.data.minhash)
        near = near_duplicates(cleaned, threshold=d.minhash_threshold, shingle=d.minhash_shingle,
                               num_perm=d.minhash_permutations, num_blocks=num_buckets)
        print(f"[prepare] MinHash: {len(near):,} near-duplicate documents to drop "
              f"(similarity >= {d.minhash_threshold})", flush=True)
    order = {"dedup": d.dedup != "none", "seed": cfg.run.seed, "drop": near}
    gather_tasks = None  # how many tasks gather at once: the writing runs in them (see the cleaning's write below)
    if num_buckets == 1:  # one bucket: the documents are gathered in one block through the object store
        docs = cleaned.repartition(1).map_batches(_dedup_and_shuffle, batch_format="pyarrow", batch_size=None,
                                                  fn_kwargs=order)
    else:  # the shuffle goes through files, as in MapReduce: each reading task writes its documents by bucket, then
        # one task per bucket gathers them. (800k built-in documents on 2 cores: this stage took 13.4 s with Ray
        # Data's keyed repartition, which starts a pool of aggregator processes for it, and 10.7 s this way.)
        buckets_dir = storage.join(docs_dir, "_buckets")
        # The same task count as the cleaning, so that Ray Data runs cleaning and writing in one task (a write
        # operator of its own moved every document through the object store, in processes started for it).
        cleaned.write_parquet(buckets_dir, partition_cols=["bucket"], concurrency=tasks.size)
        buckets = [{"dir": storage.join(buckets_dir, name)} for name in storage.list_dirs(buckets_dir)]
        gather_tasks = cores and min(cores, len(buckets))
        docs = ray.data.from_items(buckets, override_num_blocks=max(len(buckets), 1)).map_batches(
            _gather_bucket, batch_format="pyarrow", batch_size=1, compute=ray.data.TaskPoolStrategy(size=gather_tasks),
            fn_kwargs=order)
    # Files of at most DOCS_PER_FILE documents: packing runs a task per file on one thread (see tokenize_and_pack),
    # so a corpus of one bucket still packs on every core.
    docs.write_parquet(docs_dir, partition_cols=["split"], concurrency=gather_tasks, max_rows_per_file=DOCS_PER_FILE)
    storage.delete_dir(storage.join(docs_dir, "_buckets"))
    return _num_docs(docs_dir), 0 if near is None else len(near)


def _num_docs(docs_dir: str) -> dict[str, int]:
    return {split: _num_rows(storage.list_files(storage.join(docs_dir, f"split={split}"), ".parquet"))
            for split in ("train", "val")}


def _read_and_clean(piece: dict[str, np.ndarray], *, text_field: str, txt_document: str, num_buckets: int,
                    **clean) -> Iterator[pa.Table]:
    """Read one corpus piece and clean its documents, in one task, each document with its hash bucket when there are
    several. (Ray Data's text reader followed by a cleaning operator made a task and a copy of every document more
    per block: 9.6 s against 6.7 s for reading and cleaning 1M built-in documents on 2 cores.) Each table yielded is
    a file per bucket for the bucket's gathering task to read, so they are large: a piece of 32 MiB is one table, and
    a piece read whole (a compressed or Parquet file) one per PARTITION_BYTES of text."""
    path, start, end = piece["path"][0], int(piece["start"][0]), int(piece["end"][0])
    texts = piece_texts({"path": path, "start": start, "end": end}, text_field, txt_document)
    tables, size = [], 0
    for batch in iter(lambda: list(itertools.islice(texts, 16384)), []):
        tables.append(pa.Table.from_pydict(clean_batch({"text": batch}, **clean), schema=DOCS_SCHEMA))
        size += tables[-1]["text"].nbytes
        if size >= PARTITION_BYTES:
            yield _add_bucket(pa.concat_tables(tables), num_buckets=num_buckets)
            tables, size = [], 0
    if tables:
        yield _add_bucket(pa.concat_tables(tables), num_buckets=num_buckets)


def _add_bucket(docs: pa.Table, *, num_buckets: int) -> pa.Table:
    if num_buckets == 1:  # one bucket gathers through the object store, not files: no column for it
        return docs
    hashes = docs["doc_hash"].to_numpy().view(np.uint64)
    return docs.append_column("bucket", pa.array((hashes % np.uint64(num_buckets)).astype(np.int64)))


def _gather_bucket(bucket: pa.Table, **order) -> pa.Table:
    """All documents of one bucket (what every reading task wrote to its directory), deduplicated and shuffled."""
    files = storage.list_files(bucket["dir"][0].as_py(), ".parquet")
    return _dedup_and_shuffle(pa.concat_tables(
        [pq.read_table(inner, columns=["text", "doc_hash", "split"], filesystem=fs)
         for fs, inner in map(storage.filesystem_for, files)]), **order)


def _dedup_and_shuffle(docs: pa.Table, **order) -> pa.Table:
    return docs.take(shuffle_order(docs["doc_hash"].to_numpy(), **order))


def _num_rows(paths: list[str]) -> int:
    total = 0
    for path in paths:
        fs, inner = storage.filesystem_for(path)
        with fs.open_input_file(inner) as f:
            total += pq.read_metadata(f).num_rows
    return total


def _iter_texts(docs_dir: str, max_docs: int):
    """The first `max_docs` cleaned documents, streamed on the driver for tokenizer training (a plain sequential read:
    a Ray Data job would cost more to start than reading these takes)."""
    for path in storage.list_files(docs_dir, ".parquet"):
        fs, inner = storage.filesystem_for(path)
        with fs.open_input_file(inner) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1000, columns=["text"]):
                texts = batch.column(0).to_pylist()[:max_docs]
                yield from texts
                max_docs -= len(texts)
                if max_docs <= 0:
                    return


def _write_packed(cfg: Config, out_dir: str, version: str, splits: list[tuple[str, str]], tokenizer_dir: str,
                  eos_id: int, in_driver: bool) -> tuple[dict[str, list[Shard]], int, int]:
    """Tokenize and pack the documents in `<version>/<docs>` into shards in `<version>/<packed>`, for every (docs,
    packed) of `splits`, in one Ray Data job (or `in_driver`, in threads that run as its tasks would);
    returns ({packed: its shards in order}, document tokens, tokens dropped at file ends)."""
    items = []  # a task per file of cleaned documents (at most DOCS_PER_FILE)
    for docs, packed in splits:
        for i, path in enumerate(storage.list_files(storage.join(out_dir, version, docs), ".parquet")):
            items.append({"docs": path, "packed": packed, "name": f"{i:05d}"})
    # On one machine, as many tasks at once as cores (Ray Data's Parquet reader, not limited so, ran 4 tasks at once on
    # 2 cores, two of them in processes started for them).
    tasks = (cores := _cores_of_one_machine_cluster()) and min(cores, len(items))
    for item, one_thread in zip(items, tokenize_on_one_thread([storage.total_size([i["docs"]]) for i in items], cores)):
        item["one_thread"] = one_thread
    pack = dict(root=storage.join(out_dir, version), tokenizer_dir=tokenizer_dir, eos_id=eos_id,
                seq_len=cfg.data.seq_len, rows_per_shard=cfg.data.rows_per_shard, rows_per_group=rows_per_group(cfg))
    if in_driver:  # _pack_file's columns, as the rows a Ray Data job returns
        def pack_here(item: dict) -> dict:  # its threads as TOKENIZERS_PARALLELISM says (see below)
            return _pack_file({**{key: [value] for key, value in item.items()}, "one_thread": [False]}, **pack)

        if len(items) > 1 and all(item["one_thread"] for item in items):  # as many files at once as cores, each
            # on one thread, as the tasks run: the encode releases the GIL (200,000 documents on 2 cores: 7.1-7.4 s
            # against 7.6-8.5 s one file after another on the tokenizer's threads)
            with single_threaded_tokenizer(), concurrent.futures.ThreadPoolExecutor(cores) as pool:
                columns = list(pool.map(pack_here, items))
        else:
            columns = [pack_here(item) for item in items]
        written = [dict(zip(c, row)) for c in columns for row in zip(*c.values())]
    else:
        written = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _pack_file, batch_format="numpy", batch_size=1, compute=ray.data.TaskPoolStrategy(size=tasks),
            fn_kwargs=pack).materialize().take_all() if items else []  # take_all alone stalled tasks up to 4 s
    shards = {packed: [] for _, packed in splits}
    for row in sorted(written, key=lambda row: row["path"]):  # the manifest fixes the shard order
        shards[row["packed"]].append(Shard(path=f"{version}/{row['path']}", num_rows=int(row["num_rows"]),
                                           num_tokens=int(row["num_rows"]) * (cfg.data.seq_len + 1),
                                           sha256=str(row["sha256"])))
    return (shards, sum(int(row["num_doc_tokens"]) for row in written),
            sum(int(row["num_dropped_tokens"]) for row in written))


def tokenize_on_one_thread(file_bytes: list[int], cores: int | None) -> list[bool]:
    """Which packing tasks tokenize on one thread: those of a file that holds at most a core's share of the documents.
    Ray runs a task per core, and tasks each on the tokenizer's own threads oversubscribed the cores (see
    tokenize_and_pack); a larger file would set the pace on one thread, and keeps the threads (the 1,513 manual pages,
    a train file and a small validation file, pack in 1.1 s so, 1.8 s on one thread). Off one machine (`cores` None),
    every file of several is on one thread."""
    total = sum(file_bytes)
    return [len(file_bytes) > 1 and size * (cores or 1) <= total for size in file_bytes]


def _pack_file(file: dict[str, np.ndarray], *, root: str, rows_per_shard: int, rows_per_group: int,
               **pack) -> dict:
    """Ray Data batch function: one file of cleaned documents -> its packed rows, which this task writes as shards of
    at most `rows_per_shard` rows (`<root>/<packed>/<name>-000.parquet`, ...); returns a row per shard: its path under
    `root`, rows and SHA-256, and the file's token counts (on its first shard)."""
    fs, inner = storage.filesystem_for(file["docs"][0])
    texts = pq.read_table(inner, columns=["text"], filesystem=fs)["text"].to_numpy(zero_copy_only=False)
    rows, doc_tokens, dropped = tokenize_and_pack(texts, one_thread=bool(file["one_thread"][0]), **pack)
    written = {"path": [], "packed": [], "num_rows": [], "sha256": [], "num_doc_tokens": [], "num_dropped_tokens": []}
    for k, first in enumerate(range(0, len(rows), rows_per_shard)):
        shard = rows[first: first + rows_per_shard]
        path = f"{file['packed'][0]}/{file['name'][0]}-{k:03d}.parquet"
        data = _write_parquet(storage.join(root, path), pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(
            pa.array(shard.ravel(), type=pa.int32()), rows.shape[1])}), row_group_size=rows_per_group)
        for key, value in (("path", path), ("packed", file["packed"][0]), ("num_rows", len(shard)),
                           ("sha256", hashlib.sha256(data).hexdigest()), ("num_doc_tokens", doc_tokens * (k == 0)),
                           ("num_dropped_tokens", dropped * (k == 0))):
            written[key].append(value)
    return written


def _write_parquet(path: str, table: pa.Table, **options) -> bytes:
    """Write `table` as one Parquet file at `path` (local or object store) in one piece; returns the file's bytes."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, **options)
    data = buffer.getvalue().to_pybytes()
    storage.write_bytes(path, data)
    return data
