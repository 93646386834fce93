"""Find corpus files (paths, globs, URIs), check their records, and cut them into pieces for parallel reading.

Local paths use the OS glob; URIs (s3://, gs://, ...) go through pyarrow's filesystems, whose credentials and endpoint
come from the standard environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import json
import math
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ptray.errors import DataError
from ptray.storage import filesystem_for, is_uri, total_size

TEXT_EXTENSIONS = (".txt", ".text")
JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED = TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS
# Text and JSONL files may be compressed (corpus.jsonl.gz, book.txt.zst): pyarrow decompresses them as it streams.
# Such a file is read whole by one task (a compressed stream has no byte ranges to cut); Parquet compresses inside.
COMPRESSED_EXTENSIONS = (".gz", ".bz2", ".zst", ".lz4")
GLOB_CHARS = "*?["


def is_compressed(path: str) -> bool:
    return path.lower().endswith(COMPRESSED_EXTENSIONS)


def _format_name(path: str) -> str:
    """The file's name, lowercased, without a compression suffix: its extension says how to read it."""
    name = path.lower()
    return name[:name.rindex(".")] if is_compressed(name) else name


def has_format(path: str, suffixes: tuple[str, ...]) -> bool:
    """Whether the file is one of these formats, compressed or not (never a compressed Parquet file)."""
    name = _format_name(path)
    return name.endswith(suffixes) and not (is_compressed(path) and name.endswith(PARQUET_EXTENSIONS))


def expand_files(patterns: list[str], key: str = "data.train_files", suffixes: tuple[str, ...] = SUPPORTED,
                 example: str = "corpus/*.txt") -> list[str]:
    """Expand paths, directories and globs to a sorted list of files with `suffixes` (or compressed ones, see
    COMPRESSED_EXTENSIONS); error on any that match none."""
    files: list[str] = []
    for pattern in patterns:
        matched = _expand_uri(pattern) if is_uri(pattern) else _expand_local(pattern)
        matched = [f for f in matched if has_format(f, suffixes)]
        if not matched:
            raise DataError(
                f"{key} entry {pattern!r} matched no {'/'.join(suffixes)} files (text formats may be compressed: "
                f"{', '.join(COMPRESSED_EXTENSIONS)}). Check the path or glob (quote globs in the shell), e.g. "
                f"{key}=[{example}].")
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


def check_records(files: list[str], text_field: str, max_bad_fraction: float, max_tasks: int | None = None,
                  txt_document: str = "auto", in_driver: bool = False) -> int:
    """Read every record of every file once, in Ray tasks (or, `in_driver`, in this process), before any work
    starts: a file that is not UTF-8 text, a JSONL line that is not JSON, a Parquet text column that is not strings
    is an error naming the file and line; records without usable text are counted, and more than `max_bad_fraction`
    of them is an error. With data.txt_document=auto, the .txt files read as paragraphs are named. Returns the corpus
    size in bytes, compressed files counted decompressed (Parquet files as they are)."""
    # One task per file, or per group of files when `max_tasks` (a one-machine cluster's cores) is smaller: each
    # task beyond the cores starts a worker process of its own (about a second of CPU on 2 cores), for a scan of
    # tens of milliseconds.
    num_tasks = min(len(files), max_tasks or len(files))
    scanned = ([[(path, _scan_file(path, text_field, txt_document)) for path in files]] if in_driver else
               ray.get([_scan_files.remote(files[i::num_tasks], text_field, txt_document) for i in range(num_tasks)]))
    by_file = {path: scan for group in scanned for path, scan in group}
    scans = [by_file[f] for f in files]
    for scan in scans:
        if scan["error"]:
            raise DataError(scan["error"])
    if txt_document == "auto":
        say_hard_wrapped(files, [scan["txt_document"] for scan in scans])
    records, bad = sum(s["records"] for s in scans), sum(s["bad"] for s in scans)
    corpus_bytes = sum(s["bytes"] for s in scans)
    if not bad:
        return corpus_bytes
    example = next(s["example"] for s in scans if s["bad"])
    summary = (f"{bad:,} of {records:,} corpus records have no usable text in field {text_field!r} (e.g. {example})")
    if bad > max_bad_fraction * records:
        raise DataError(f"{summary}: more than data.max_bad_fraction={max_bad_fraction}. Set data.text_field to the "
                        "field that holds the text, fix the records, or raise data.max_bad_fraction to skip them.")
    print(f"[prepare] skipping {summary}", flush=True)
    return corpus_bytes


@ray.remote(num_cpus=0.5)
def _scan_files(paths: list[str], text_field: str, txt_document: str) -> list[tuple[str, dict]]:
    return [(path, _scan_file(path, text_field, txt_document)) for path in paths]


def _scan_file(path: str, text_field: str, txt_document: str = "auto") -> dict:
    """{records, bad, example, error, txt_document, bytes} for one corpus file (see check_records)."""
    scan = {"records": 0, "bad": 0, "example": "", "error": "", "txt_document": "", "bytes": 0}
    fs, inner = filesystem_for(path)
    try:
        if has_format(path, PARQUET_EXTENSIONS):
            scan["bytes"] = fs.get_file_info(inner).size or 0
            with fs.open_input_file(inner) as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                if text_field not in names:
                    scan["error"] = (f"{path} has no column {text_field!r} (columns: {', '.join(names)}); set "
                                     "data.text_field to the column that holds the text.")
                    return scan
                kind = parquet.schema_arrow.field(text_field).type
                if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                    scan["error"] = (f"{path}: column {text_field!r} holds {kind}, not text; set data.text_field to "
                                     "a string column.")
                    return scan
                column = parquet.metadata.schema.names.index(text_field)
                scan["records"] = parquet.metadata.num_rows
                for g in range(parquet.metadata.num_row_groups):
                    stats = parquet.metadata.row_group(g).column(column).statistics
                    nulls = stats.null_count if stats is not None and stats.has_null_count else 0
                    scan["bad"] += nulls
                    if nulls and not scan["example"]:
                        scan["example"] = f"{path}: null values in row group {g}"
            return scan
        is_jsonl = has_format(path, JSONL_EXTENSIONS)
        for number, line in enumerate(_lines(fs, inner), 1):
            scan["bytes"] += len(line) + 1
            if b"\0" in line:
                scan["error"] = (f"{path} line {number} holds NUL bytes: a binary file, not text. Remove it from "
                                 "data.train_files.")
                return scan
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                scan["error"] = (f"{path} line {number} is not UTF-8 text ({e.reason} at byte {e.start}). Text in "
                                 "another encoding: convert it (e.g. iconv -f latin1 -t utf-8); a binary file: remove "
                                 "it from data.train_files.")
                return scan
            if not text.strip():
                continue
            scan["records"] += 1
            if not is_jsonl:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                scan["error"] = (f"{path} line {number} is not JSON ({e.msg}); JSONL files hold one JSON object "
                                 "per line.")
                return scan
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                scan["bad"] += 1
                if not scan["example"]:
                    what = ("no field" if not isinstance(record, dict) or text_field not in record
                            else f"a {type(value).__name__} in field")
                    scan["example"] = f"{path} line {number}: {what} {text_field!r}"
        if not is_jsonl:
            scan["txt_document"] = txt_document_of(fs, inner, txt_document)
    except OSError as e:
        scan["error"] = f"cannot read corpus file {path}: {e}. The file is unreadable or corrupt; fix or remove it."
    except Exception as e:  # a corrupt Parquet footer and the like
        scan["error"] = f"cannot read corpus file {path}: {e}. The file is unreadable or corrupt; fix or remove it."
    return scan


def corpus_pieces(files: list[str], piece_bytes: int = 32 << 20, txt_document: str = "auto") -> list[dict]:
    """The corpus cut into pieces of about `piece_bytes` for parallel reading: text and JSONL files by byte range
    (each line, or paragraph, belongs to the piece its first byte falls in), Parquet and compressed files whole
    (streamed), and text files whole when each is one document (data.txt_document=file)."""
    whole = PARQUET_EXTENSIONS + (TEXT_EXTENSIONS if txt_document == "file" else ())
    pieces = []
    for path in files:
        size = total_size([path])
        cuts = 1 if has_format(path, whole) or is_compressed(path) else max(1, math.ceil(size / piece_bytes))
        bounds = [size * k // cuts for k in range(cuts + 1)]
        pieces += [{"path": path, "start": start, "end": end} for start, end in zip(bounds, bounds[1:])]
    return pieces


def piece_texts(piece: dict, text_field: str, txt_document: str = "auto") -> Iterator[str]:
    """The raw documents of a piece (see corpus_pieces). Run after `check_records`, which has rejected files that are
    not text, JSON or string columns, and counted the records without usable text that this skips."""
    fs, inner = filesystem_for(piece["path"])
    if has_format(piece["path"], PARQUET_EXTENSIONS):
        yield from parquet_texts(fs, inner, text_field)
        return
    is_jsonl = has_format(piece["path"], JSONL_EXTENSIONS)
    end = None if is_compressed(piece["path"]) else piece["end"]  # a whole file; its size is not its text's
    records = (_lines if is_jsonl else functools.partial(txt_documents, setting=txt_document))(
        fs, inner, start=piece["start"], end=end)
    for record in records:
        if (text := record_text(record, is_jsonl, text_field)) is not None:
            yield text


# ---- what one document of a .txt file is (data.txt_document) ----------------------------------------------------


def txt_document_of(fs, path: str, setting: str) -> str:
    """`setting`, or for `auto` what the start of the file shows: paragraph if it looks hard-wrapped, else line. Every
    reader of the file decides alike, from its first MiB."""
    if setting != "auto":
        return setting
    with fs.open_input_stream(path) as handle:
        head = handle.read(1 << 20)
    lines = head.split(b"\n")
    if len(head) == 1 << 20:
        lines = lines[:-1]  # a line cut by the MiB
    return "paragraph" if looks_hard_wrapped([line.decode("utf-8", "replace").strip() for line in lines]) else "line"


def say_hard_wrapped(files: list[str], units: list[str], stage: str = "prepare") -> None:
    """Name the .txt files that data.txt_document=auto reads by paragraph (`units`: what each file was read as)."""
    if wrapped := [f for f, unit in zip(files, units) if unit == "paragraph"]:
        texts = sum(has_format(f, TEXT_EXTENSIONS) for f in files)
        print(f"[{stage}] {len(wrapped)} of {texts} .txt files look hard-wrapped (e.g. {wrapped[0]}): each of their "
              "paragraphs is a document" + (", each line of the others" if len(wrapped) < texts else "") +
              ". Set data.txt_document (line, paragraph or file) to choose.", flush=True)


def looks_hard_wrapped(lines: list[str]) -> bool:
    """Whether these lines are hard-wrapped prose (a book, a README): paragraphs of a few lines (1.5 to 50 on
    average) between blank lines, and the lines that do not end a paragraph filled to one width of at most 120
    characters (half of them to 0.6 of it, at least; lists and tables fill less). A file of one document per line has
    no blank lines, or lines of any length."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line:
            current.append(len(line))
        elif current:
            paragraphs.append(current)
            current = []
    filled = sorted(n for paragraph in paragraphs for n in paragraph[:-1])
    if len(paragraphs) < 2 or not 1.5 <= (len(filled) + len(paragraphs)) / len(paragraphs) <= 50:
        return False
    width = filled[int(0.95 * (len(filled) - 1))]
    return width <= 120 and sum(n >= 0.6 * width for n in filled) >= 0.5 * len(filled)


def txt_documents(fs, path: str, setting: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The documents of a .txt file (data.txt_document) that begin in the byte range [start, end), as bytes."""
    unit = txt_document_of(fs, path, setting)
    if unit == "line":
        yield from _lines(fs, path, start, end)
    elif unit == "paragraph":
        yield from _paragraphs(fs, path, start, end)
    elif start == 0:  # file: corpus_pieces keeps it whole
        with fs.open_input_stream(path) as handle:
            yield handle.read()


def _paragraphs(fs, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Runs of non-blank lines, each joined by spaces, whose first line begins in [start, end). Lines from up to 64
    KiB before `start` are read to know whether a paragraph begins at it."""
    lines, owned, after_blank = [], False, True
    for position, line in _positioned_lines(fs, path, max(start - (64 << 10), 0)):
        if not line.strip():
            if owned:
                yield b" ".join(lines)
            lines, owned, after_blank = [], False, True
            continue
        if after_blank:  # a paragraph begins here
            if end is not None and position >= end:
                return
            owned = position >= start
        if owned:
            lines.append(line.strip())
        after_blank = False
    if owned:
        yield b" ".join(lines)


def parquet_texts(fs, path: str, text_field: str) -> Iterator[str]:
    """A Parquet file's text column, streamed by row batches (null values skipped)."""
    with fs.open_input_file(path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(columns=[text_field], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def record_text(line: bytes, is_jsonl: bool, text_field: str) -> str | None:
    """The document in a line of a text file, or in a JSONL record's `text_field`; None for a blank line or a record
    without text. Raises UnicodeDecodeError or json.JSONDecodeError on a line that is not UTF-8 or not JSON."""
    text = line.decode("utf-8")
    if is_jsonl and text.strip():
        record = json.loads(text)
        text = record.get(text_field) if isinstance(record, dict) else None
    return text if isinstance(text, str) and text.strip() else None


def _lines(fs, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """A file's lines as bytes, streamed: those that begin in the byte range [start, end), the whole file by default.
    Ranges that cut a file anywhere give each line to exactly one of them."""
    return (line for _, line in _positioned_lines(fs, path, start, end))


def _positioned_lines(fs, path: str, start: int = 0, end: int | None = None,
                      chunk_bytes: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """(where it begins, line) for the lines of a file that begin in [start, end) (see `_lines`)."""
    with (fs.open_input_file(path) if start else fs.open_input_stream(path)) as handle:
        if start:
            handle.seek(start - 1)  # a line begins at `start` only if the byte before it ends a line
        position, rest, skipping = max(start - 1, 0), b"", start > 0  # position: where the next line begins
        while chunk := handle.read(chunk_bytes):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if end is not None and position >= end:
                    return
                if not skipping:
                    yield position, line
                skipping = False  # the first split was the end of a line that began before `start`
                position += len(line) + 1
    if rest and not skipping and (end is None or position < end):
        yield position, rest
