"""Find corpus files (paths, globs, URIs) and read them as a Ray Dataset with one `text` column.

Local paths use the OS glob; URIs (s3://, gs://, ...) go through pyarrow's filesystems, whose credentials and endpoint
come from the standard environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from ptray.errors import DataError
from ptray.storage import filesystem_for, is_uri

TEXT_EXTENSIONS = (".txt", ".text")
JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED = TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS
GLOB_CHARS = "*?["


def expand_files(patterns: list[str]) -> list[str]:
    """Expand paths, directories and globs to a sorted list of supported files; error on any that match nothing."""
    files: list[str] = []
    for pattern in patterns:
        matched = _expand_uri(pattern) if is_uri(pattern) else _expand_local(pattern)
        matched = [f for f in matched if f.lower().endswith(SUPPORTED)]
        if not matched:
            raise DataError(
                f"data.train_files entry {pattern!r} matched no {'/'.join(SUPPORTED)} files. "
                "Check the path or glob (quote globs in the shell), e.g. data.train_files=[corpus/*.txt].")
        files.extend(matched)
    return sorted(dict.fromkeys(files))


def _expand_local(pattern: str) -> list[str]:
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    return [os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]


def _expand_uri(pattern: str) -> list[str]:
    scheme, rest = pattern.split("://", 1)
    glob_at = min((rest.find(c) for c in GLOB_CHARS if c in rest), default=-1)
    base = rest if glob_at < 0 else rest[:glob_at].rsplit("/", 1)[0]  # deepest folder above the first glob char
    fs, _ = filesystem_for(f"{scheme}://{base}")
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            found = [base]
        elif info.type == pafs.FileType.Directory:
            found = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                     if i.type == pafs.FileType.File]
        else:
            found = []
    except OSError as e:
        raise DataError(f"cannot list {pattern!r}: {e}. Check the bucket name and the storage credentials.") from None
    if glob_at >= 0:
        found = [f for f in found if fnmatch.fnmatch(f, rest)]
    return [f"{scheme}://{f}" for f in found]


def check_readable(files: list[str], text_field: str) -> None:
    """Fail early, naming the file, on corrupt Parquet footers or a missing text field (cheap: footers and first lines)."""
    for f in files:
        fs, path = filesystem_for(f)
        try:
            if f.lower().endswith(PARQUET_EXTENSIONS):
                with fs.open_input_file(path) as handle:
                    schema = pq.read_schema(handle)
                if text_field not in schema.names:
                    raise DataError(f"{f} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                                    f"set data.text_field to the column that holds the text.")
            elif f.lower().endswith(JSONL_EXTENSIONS):
                with fs.open_input_stream(path) as handle:
                    first = handle.read(1 << 20).split(b"\n", 1)[0].strip()
                if first:
                    row = json.loads(first)
                    if not isinstance(row, dict) or text_field not in row:
                        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                        raise DataError(f"{f}: first record has no field {text_field!r} (has: {keys}); "
                                        f"set data.text_field to the field that holds the text.")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read corpus file {f}: {e}. The file is unreadable or corrupt; fix or remove it.") from None


def read_corpus(files: list[str], text_field: str) -> ray.data.Dataset:
    """One Ray Dataset with a `text` column over all files, read lazily and streamed."""
    check_readable(files, text_field)
    by_kind = {
        "text": [f for f in files if f.lower().endswith(TEXT_EXTENSIONS)],
        "jsonl": [f for f in files if f.lower().endswith(JSONL_EXTENSIONS)],
        "parquet": [f for f in files if f.lower().endswith(PARQUET_EXTENSIONS)],
    }
    parts = []  # (dataset, column holding the text)
    if by_kind["text"]:
        parts.append((ray.data.read_text(by_kind["text"], drop_empty_lines=True), "text"))
    if by_kind["jsonl"]:
        parts.append((ray.data.read_json(by_kind["jsonl"], lines=True), text_field))
    if by_kind["parquet"]:
        parts.append((ray.data.read_parquet(by_kind["parquet"]), text_field))
    # One Arrow `text` column per part, so the union has a single schema and block type.
    parts = [ds.map_batches(_text_column, batch_format="pyarrow", fn_kwargs={"field": field}) for ds, field in parts]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _text_column(table, *, field: str):
    import pyarrow as pa

    return pa.table({"text": table[field].cast(pa.string())})
