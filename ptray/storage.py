"""Paths that are local directories or object-store URIs (s3://, gs://), through pyarrow's filesystems.

Credentials and endpoints come from the standard environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, GOOGLE_APPLICATION_CREDENTIALS, ...): they never appear in a config or a log.

Commits: a local file is written to a temporary name and renamed; an object-store object appears only once its upload
completes, so one object written last (a manifest, a marker) commits everything written before it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import shutil
import tempfile
import urllib.parse

import pyarrow.fs as pafs

from ptray.errors import ConfigError, DataError


def is_uri(path: str) -> bool:
    return "://" in path


def check_uri(path: str, key: str) -> None:
    """Reject URIs that carry credentials (they would end up in config.yaml and logs)."""
    if is_uri(path) and "@" in urllib.parse.urlsplit(path).netloc:
        raise ConfigError(f"{key} has credentials in the URI; remove them and set them in the environment instead "
                          "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the store's usual variables).")


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as e:  # pyarrow raises several types for bad schemes and credentials
            raise DataError(f"cannot open {path!r}: {e}. Check the URI scheme and the storage credentials.") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
    return path if not path or is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    fs, inner = filesystem_for(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_text(path: str) -> str:
    fs, inner = filesystem_for(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    """Write a whole file so that readers see the old content or the new, never a part."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a part."""
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, inner = filesystem_for(path)
    with fs.open_output_stream(inner) as f:  # one PUT: the object appears whole or not at all
        f.write(data)


def list_files(directory: str, suffix: str = "") -> list[str]:
    """Files under `directory` (recursively) ending in `suffix`, sorted, as paths of the same kind as `directory`."""
    fs, inner = filesystem_for(directory)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    if not is_uri(directory):
        return found
    scheme = directory.split("://", 1)[0]
    return [f"{scheme}://{p}" for p in found]


def total_size(paths: list[str]) -> int:
    """Bytes in these files (local or object store)."""
    total = 0
    for path in paths:
        fs, inner = filesystem_for(path)
        total += fs.get_file_info(inner).size or 0
    return total


def sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, streamed (local or object store)."""
    digest = hashlib.sha256()
    fs, inner = filesystem_for(path)
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def list_dirs(directory: str) -> list[str]:
    """Names of the immediate subdirectories of `directory` ([] if it does not exist)."""
    fs, inner = filesystem_for(directory)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return []
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in fs.get_file_info(pafs.FileSelector(inner))
                  if i.type == pafs.FileType.Directory)


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two locations (local or object store)."""
    if not is_uri(src) and not is_uri(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    src_fs, src_inner = filesystem_for(src)
    dst_fs, dst_inner = filesystem_for(dst)
    if not is_uri(dst):
        os.makedirs(dst_inner, exist_ok=True)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def delete_dir(path: str) -> None:
    fs, inner = filesystem_for(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)


def check_writable(path: str, key: str) -> None:
    """Fail before any work starts when `path` (config key `key`) cannot be written:
    a missing bucket, bad credentials."""
    if not is_uri(path):
        return
    fs, inner = filesystem_for(path)
    probe = posixpath.join(inner, f".ptray-write-check-{os.getpid()}")
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:
        reason = str(e).split(" (Request ID")[0]
        raise DataError(f"cannot write to {key}={path!r}: {reason}. Check that the bucket exists and that the "
                        "storage credentials in the environment (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL) allow "
                        "writing there.") from None


@functools.lru_cache(maxsize=16)
def local_dir(path: str) -> str:
    """A local directory with the contents of `path`: itself if local, else a download cached for this process."""
    if not is_uri(path):
        return path
    root = os.path.join(tempfile.gettempdir(), "ptray-cache")
    # prepared data is versioned: no staleness
    cache = os.path.join(root, hashlib.sha256(path.encode()).hexdigest()[:16])
    if not os.path.isdir(cache):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
        copy_dir(path, tmp)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
    return cache
