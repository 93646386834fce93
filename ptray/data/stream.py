"""`data.ingest: ray_data`: the training rows stream from the corpus files through Ray Data into the Train workers,
with no prepare pass first.

    ptray pretrain --config tiny data.ingest=ray_data

Each corpus file is a *source*. One Ray Data task per (epoch, source) reads the file, cleans its documents as
`prepare` does (validation documents, chosen by hash, left out; duplicates removed within the file), shuffles them in
seeded chunks, tokenizes and packs them with the Rust tokenizer, and yields the rows in order, each tagged with
(epoch, source, index). The tasks run on the CPUs the cluster has beside the training workers, CPU-only nodes
included, while the workers train; each worker reads its share with `ray.train.get_dataset_shard("train")`.

Exactly once: every checkpoint records, per (epoch, source), the rows the workers have trained on (`Delivered`). A
resumed run, on any world size, regenerates the stream without those rows, so no row is repeated or lost. The
order in which the sources' rows interleave may differ from run to run (Ray Data runs the sources in parallel);
`data.ingest: shards` gives a bitwise-identical order instead, after a prepare pass.

Before training, the driver writes `<run.dir>/stream/`: the tokenizer (`data.tokenizer_path`, or a BPE trained on the
first `data.tokenizer_train_docs` documents), one validation shard (the first validation documents, enough for
pretraining's evaluations) and a manifest, so that evaluation, export and the resume checks work as with prepared
data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from ptray import storage
from ptray.config import Config
from ptray.data.clean import clean_text, doc_hash, is_validation, shuffle_key
from ptray.data.manifest import Manifest, Shard, read_manifest, write_manifest
from ptray.data.readers import (JSONL_EXTENSIONS, PARQUET_EXTENSIONS, TEXT_EXTENSIONS, _lines, has_format,
                                parquet_texts, record_text, say_hard_wrapped, txt_document_of, txt_documents)
from ptray.data.pack import encode_documents, pack_rows
from ptray.data.tokenizer import (copy_tokenizer, end_of_document_id, fast_tokenizer, load_tokenizer, tokenizer_hash,
                                  train_bpe)
from ptray.errors import ConfigError, DataError

CHUNK_DOCS = 2048  # documents shuffled and tokenized together inside a source


def stream_dir(cfg: Config) -> str:
    return os.path.join(cfg.run_dir, "stream")


# ---- one source: documents -> packed rows --------------------------------------------------------------------------


def source_texts(path: str, text_field: str, txt_document: str = "auto") -> Iterator[str]:
    """A corpus file's raw documents: a text file's lines, paragraphs or whole text (data.txt_document), a JSONL
    file's `text_field`, a Parquet column."""
    fs, inner = storage.filesystem_for(path)
    try:
        if has_format(path, PARQUET_EXTENSIONS):
            yield from parquet_texts(fs, inner, text_field)
            return
        is_jsonl = has_format(path, JSONL_EXTENSIONS)
        unit = "line" if is_jsonl else txt_document_of(fs, inner, txt_document)
        records = _lines(fs, inner) if is_jsonl else txt_documents(fs, inner, unit)
        for number, line in enumerate(records, 1):
            try:
                text = record_text(line, is_jsonl, text_field)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path} {unit} {number} is not {'JSON' if is_jsonl else 'UTF-8 text'} ({e}); fix or "
                                "remove the file (`ptray prepare` lists every such record).") from None
            if text is not None:
                yield text
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read corpus file {path}: {e}. The file is unreadable or corrupt; fix or remove "
                        "it.") from None


def source_documents(path: str, data: dict, seed: int, split: str) -> Iterator[str]:
    """The cleaned documents of one split of a file, in file order (`data`: the config's data section)."""
    seen: set[int] = set()
    for raw in source_texts(path, data["text_field"], data["txt_document"]):
        text = clean_text(raw, normalize_unicode=data["normalize_unicode"], strip_html=data["strip_html"],
                          collapse_whitespace=data["collapse_whitespace"])
        if len(text) < max(data["min_chars"], 1):
            continue
        h = doc_hash(text)
        if is_validation(h, data["val_fraction"], seed) != (split == "val"):
            continue
        if data["dedup"] != "none":
            if h in seen:
                continue
            seen.add(h)
        yield text


def source_rows(path: str, *, data: dict, seed: int, split: str, tokenizer_dir: str, eos_id: int,
                chunk_seed: int) -> Iterator[np.ndarray]:
    """A file's packed rows of `data.seq_len + 1` tokens, in chunks: documents shuffled within chunks of CHUNK_DOCS
    (seeded by `chunk_seed`), each followed by the end-of-document token `eos_id`, the stream cut into rows. The tail
    shorter than a row is dropped."""
    tokenizer = fast_tokenizer(tokenizer_dir)
    row_len = data["seq_len"] + 1
    carry = np.empty(0, dtype=np.int32)
    documents = source_documents(path, data, seed, split)
    while chunk := list(itertools.islice(documents, CHUNK_DOCS)):
        hashes = np.array([doc_hash(t) for t in chunk], dtype=np.int64)
        chunk = [chunk[i] for i in np.argsort(shuffle_key(hashes, chunk_seed), kind="stable")]
        rows, carry = pack_rows(np.concatenate([carry, encode_documents(tokenizer, chunk, eos_id)]), row_len)
        if len(rows):
            yield rows


# ---- what has been trained: per (epoch, source), a prefix and the rows past it -------------------------------------


class Delivered:
    """The rows trained so far, per `epoch:source` key: `[prefix, [extra indices]]`: rows 0..prefix-1 all trained,
    and the extra ones past the prefix (the workers' shuffle buffers take rows out of order)."""

    def __init__(self, saved: dict | None = None):
        self.parts = {key: (int(prefix), set(extra)) for key, (prefix, extra) in (saved or {}).items()}

    def add(self, epoch: int, source: int, indices) -> None:
        prefix, extra = self.parts.setdefault(f"{epoch}:{source}", (0, set()))
        extra.update(int(i) for i in indices if i >= prefix)
        while prefix in extra:
            extra.remove(prefix)
            prefix += 1
        self.parts[f"{epoch}:{source}"] = (prefix, extra)

    def merge(self, rows: list[tuple[int, int, int]]) -> None:
        for (epoch, source), group in itertools.groupby(sorted(rows), key=lambda r: (r[0], r[1])):
            self.add(epoch, source, [index for _, _, index in group])

    def trained(self, epoch: int, source: int) -> tuple[int, set[int]]:
        return self.parts.get(f"{epoch}:{source}", (0, set()))

    def to_dict(self) -> dict:
        return {key: [prefix, sorted(extra)] for key, (prefix, extra) in sorted(self.parts.items())}


def stream_item_rows(batch: dict[str, np.ndarray], *, data: dict, seed: int, tokenizer_dir: str, eos_id: int,
                     delivered: dict) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function over (epoch, source, path) items: their rows not yet trained, tagged."""
    done = Delivered(delivered)
    for epoch, source, path in zip(batch["epoch"], batch["source"], batch["path"]):
        prefix, extra = done.trained(int(epoch), int(source))
        first = 0
        for rows in source_rows(str(path), data=data, seed=seed, split="train", tokenizer_dir=tokenizer_dir,
                                eos_id=eos_id, chunk_seed=seed * 1_000_003 + int(epoch)):
            index = np.arange(first, first + len(rows), dtype=np.int64)
            first += len(rows)
            keep = index >= prefix
            if extra:
                keep &= ~np.isin(index, np.fromiter(extra, dtype=np.int64))
            if keep.any():
                yield {"input_ids": rows[keep], "epoch": np.full(int(keep.sum()), epoch, dtype=np.int32),
                       "source": np.full(int(keep.sum()), source, dtype=np.int32), "index": index[keep]}


def train_dataset(cfg: Config, manifest: Manifest, delivered: dict) -> ray.data.Dataset:
    """The training stream from the resume point on: enough epochs over the sources for `pretrain.max_steps`, each
    (epoch, source) one task, the rows in `delivered` left out. Lazy: Ray Data runs the tasks as the workers read."""
    files = manifest.source_files
    needed_tokens = cfg.pretrain.max_steps * cfg.pretrain.global_batch_size * (cfg.data.seq_len + 1)
    # At least 1 token per 8 bytes of text, so this many epochs cover the run with room to spare (a stream that ran
    # out anyway stops the run with an error naming it).
    min_tokens = max(1, storage.total_size(files) // 8)
    epochs = 1 + math.ceil(needed_tokens / min_tokens)
    items = [{"epoch": e, "source": s, "path": path} for e in range(epochs) for s, path in enumerate(files)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        stream_item_rows, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(data=data_settings(cfg), seed=cfg.run.seed,
                       tokenizer_dir=os.path.join(stream_dir(cfg), manifest.tokenizer_dir), eos_id=manifest.eos_id,
                       delivered=delivered))


def data_settings(cfg: Config) -> dict:
    d = cfg.data
    return {key: getattr(d, key) for key in ("text_field", "txt_document", "normalize_unicode", "strip_html",
                                             "collapse_whitespace", "min_chars", "val_fraction", "dedup", "seq_len")}


# ---- the driver: tokenizer, validation shard, manifest --------------------------------------------------------------


def start_stream(cfg: Config, files: list[str]) -> Manifest:
    """The stream's tokenizer, validation rows and manifest under `<run.dir>/stream/`, written once per run (a rerun
    that resumes must tokenize as the first run did) and then reused."""
    out = stream_dir(cfg)
    settings = {"data.ingest": "ray_data", **{f"data.{k}": v for k, v in data_settings(cfg).items()},
                "data.tokenizer_path": storage.absolute(cfg.data.tokenizer_path),
                "data.vocab_size": cfg.data.vocab_size,
                "data.tokenizer_train_docs": cfg.data.tokenizer_train_docs, "data.train_files": files,
                "run.seed": cfg.run.seed}
    if os.path.exists(os.path.join(out, "manifest.json")):
        manifest = read_manifest(out)
        changed = [f"{k} {manifest.settings.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if manifest.settings.get(k, v if k == "data.txt_document" else None) != v]  # new in 2026-12
        if changed:
            raise ConfigError(f"{out} was set up for this run with other data settings ({'; '.join(changed)}), and "
                              "its checkpoints were trained on that stream. Use another run.dir (or run.name) for "
                              "the new data, or restore the settings.")
        return manifest
    d = cfg.data
    check_sources(files, d.text_field, d.txt_document)
    tokenizer_dir = os.path.join(out, "tokenizer")
    if d.tokenizer_path:
        copy_tokenizer(d.tokenizer_path, tokenizer_dir)
    else:  # a sample from the start of the corpus: the first tokenizer_train_docs training documents
        documents = itertools.chain.from_iterable(
            source_documents(f, data_settings(cfg), cfg.run.seed, "train") for f in files)
        sample = list(itertools.islice(documents, d.tokenizer_train_docs))
        if not sample:
            raise DataError(f"the corpus ({len(files)} files, e.g. {files[0]}) has no documents left after cleaning "
                            f"(data.min_chars={d.min_chars}); check the files and data.text_field={d.text_field!r}.")
        train_bpe(sample, vocab_size=d.vocab_size, out_dir=tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    val = validation_rows(cfg, files, tokenizer_dir, end_of_document_id(tokenizer))
    os.makedirs(os.path.join(out, "val"), exist_ok=True)
    val_path = os.path.join(out, "val", "rows.parquet")
    pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(
        pa.array(val.ravel(), type=pa.int32()), d.seq_len + 1)}), val_path, row_group_size=256)
    shards = [Shard(path="val/rows.parquet", num_rows=len(val), num_tokens=val.size,
                    sha256=storage.sha256(val_path))] if len(val) else []
    manifest = Manifest(
        seq_len=d.seq_len, vocab_size=len(tokenizer), tokenizer_hash=tokenizer_hash(tokenizer_dir),
        eos_id=end_of_document_id(tokenizer), pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id,
        source_files=files, train=[], val=shards, tokenizer_dir="tokenizer", rows_per_group=256, settings=settings,
        content_hash=hashlib.sha256(json.dumps(source_identity(files)).encode()).hexdigest())
    write_manifest(manifest, out)  # last: its presence marks a complete stream directory
    return manifest


def validation_rows(cfg: Config, files: list[str], tokenizer_dir: str, eos_id: int) -> np.ndarray:
    """The first validation rows of the corpus (files in order), as many as evaluation reads on any world size up to
    twice this one's."""
    p = cfg.pretrain
    wanted = 2 * cfg.cluster.num_workers * p.eval_batches * p.micro_batch_size
    found, total = [], 0
    for path in files:
        for rows in source_rows(path, data=data_settings(cfg), seed=cfg.run.seed, split="val",
                                tokenizer_dir=tokenizer_dir, eos_id=eos_id, chunk_seed=cfg.run.seed):
            found.append(rows)
            total += len(rows)
            if total >= wanted:
                return np.concatenate(found)[:wanted]
    return np.concatenate(found) if found else np.empty((0, cfg.data.seq_len + 1), dtype=np.int32)


def check_sources(files: list[str], text_field: str, txt_document: str = "auto") -> None:
    """Every source opens and yields a first document: a missing, unreadable or empty file stops the run here, on
    the driver, rather than in a Ray Data task mid-training."""
    for path in files:
        if next(source_texts(path, text_field, txt_document), None) is None:
            raise DataError(f"corpus file {path} holds no documents (field {text_field!r}); remove it from "
                            "data.train_files or fix data.text_field.")
    if txt_document == "auto":
        texts = [path for path in files if has_format(path, TEXT_EXTENSIONS)]
        say_hard_wrapped(texts, [txt_document_of(*storage.filesystem_for(path), "auto") for path in texts], "pretrain")


def source_identity(files: list[str]) -> list:
    """What the stream's rows depend on besides the settings: each source's path, size and modification time."""
    identity = []
    for path in files:
        fs, inner = storage.filesystem_for(path)
        info = fs.get_file_info(inner)
        identity.append([path, info.size, str(info.mtime_ns if info.mtime_ns is not None else info.mtime)])
    return identity
