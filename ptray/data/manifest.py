"""`manifest.json`: what `prepare` produced, and the contract `pretrain` checks before it starts.

The manifest is written last, so its presence marks a complete prepared dataset. Shard and tokenizer paths in it are
relative to the prepared directory, which may be local or an object-store URI.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from ptray import storage
from ptray.config import LEGACY_VALUES
from ptray.errors import DataError

MANIFEST = "manifest.json"


@dataclass
class Shard:
    path: str
    """Relative to the prepared directory."""
    num_rows: int
    num_tokens: int
    sha256: str = ""
    """Of the file's bytes: the same corpus and config give the same shards, byte for byte."""


@dataclass
class Manifest:
    seq_len: int
    """Rows hold seq_len + 1 tokens: inputs are row[:-1], next-token targets row[1:]."""
    vocab_size: int
    """len(tokenizer): the smallest embedding a model may have."""
    tokenizer_hash: str
    eos_id: int
    pad_id: int | None
    mask_id: int | None
    source_files: list[str]
    train: list[Shard]
    val: list[Shard]
    num_docs: dict[str, int] = field(default_factory=dict)
    num_doc_tokens: int = 0
    num_dropped_tokens: int = 0
    num_near_duplicates: int = 0
    """Documents dropped as near-duplicates of others (data.dedup=minhash)."""
    sources: list[dict] = field(default_factory=list)
    """A mixture's sources (data.sources), in order: name, weight, files, train_shards ([first, end) indices into
    `train`), num_docs, num_train_tokens. Empty: one corpus."""
    tokenizer_dir: str = "tokenizer"
    """Relative to the prepared directory."""
    rows_per_group: int = 256
    """Rows per Parquet row group of the packed shards: the unit the training reader shuffles and reads."""
    content_hash: str = ""
    """SHA-256 over the shards' own hashes, in manifest order: equal for two prepares of the same corpus and config."""
    settings: dict = field(default_factory=dict)
    """The config values the data was prepared with (`prepare_settings`): a rerun that changes one is noticed."""

    @property
    def num_train_rows(self) -> int:
        return sum(s.num_rows for s in self.train)

    @property
    def num_train_tokens(self) -> int:
        return sum(s.num_tokens for s in self.train)

    def shard_paths(self, root: str, split: str) -> list[str]:
        return [storage.join(root, s.path) for s in getattr(self, split)]


def write_manifest(manifest: Manifest, root: str) -> None:
    storage.write_text(storage.join(root, MANIFEST), json.dumps(dataclasses.asdict(manifest), indent=2))


def read_manifest(root: str) -> Manifest:
    path = storage.join(root, MANIFEST)
    if not storage.exists(path):
        raise DataError(f"no prepared data at {root!r} ({MANIFEST} missing). Run `ptray prepare --config ...` first, "
                        "or point data.prepared_dir at a directory that `ptray prepare` wrote.")
    try:
        raw = json.loads(storage.read_text(path))
        raw["train"] = [Shard(**s) for s in raw["train"]]
        raw["val"] = [Shard(**s) for s in raw["val"]]
        raw["settings"] = {key: LEGACY_VALUES.get(key, {}).get(value, value) if isinstance(value, bool) else value
                           for key, value in raw.get("settings", {}).items()}  # data.dedup: true reads as "exact"
        return Manifest(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is corrupt ({e}); delete {root!r} and run `ptray prepare` again.") from None


def verify_shards(manifest: Manifest, root: str) -> None:
    """Check every shard exists and its Parquet footer agrees with the manifest (cheap: footers only)."""
    for split in ("train", "val"):
        for shard in getattr(manifest, split):
            path = storage.join(root, shard.path)
            fs, inner = storage.filesystem_for(path)
            try:
                with fs.open_input_file(inner) as handle:
                    num_rows = pq.read_metadata(handle).num_rows
            except Exception as e:
                raise DataError(f"shard {path} is unreadable or corrupt ({e}). Delete {root!r} and run "
                                "`ptray prepare` again.") from None
            if num_rows != shard.num_rows:
                raise DataError(f"shard {path} has {num_rows} rows but the manifest says {shard.num_rows}; the "
                                f"prepared data was modified. Delete {root!r} and run `ptray prepare` again.")
