"""Object storage: corpus, prepared shards and checkpoints in S3,
against a real S3-compatible server (moto) on 127.0.0.1.

The round trip is prepare -> pretrain (checkpoints in S3) -> export, then a rerun that resumes from the S3 checkpoint.
"""

import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from conftest import free_port, tiny_config
from ptray import storage
from ptray.data.builtin import write_builtin_corpus
from ptray.data.readers import corpus_pieces, piece_texts
from ptray.errors import ConfigError, DataError
from ptray.metrics import read_metrics

BUCKET = "ptray-test"
SECRET = "s3cr3t-never-logged"  # distinctive, so the test can check it appears in no file or log


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on loopback; credentials and endpoint in the environment before Ray starts (workers inherit)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "ptray", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_with_s3(s3_server):
    from ptray.session import ray_session

    with ray_session(tiny_config("/tmp/unused")):
        yield s3_server


def test_prepare_pretrain_export_and_resume_through_s3(ray_with_s3, tmp_path, capfd):
    bucket = ray_with_s3
    local_corpus = write_builtin_corpus(str(tmp_path / "corpus"), 4000)
    storage.copy_dir(str(tmp_path / "corpus"), f"{bucket}/corpus")
    run_dir = tmp_path / "run"
    overrides = [f"data.train_files=[{bucket}/corpus/*.txt]", f"data.prepared_dir={bucket}/prepared",
                 f"run.storage_path={bucket}/checkpoints", "pretrain.ckpt_every=5", "pretrain.log_every=5",
                 "pretrain.eval_every=10", "pretrain.eval_batches=2"]
    from ptray.pretrain import pretrain

    result = pretrain(tiny_config(run_dir, "pretrain.max_steps=10", *overrides))

    # Prepare reads big files in byte ranges: cut in an object store (seek + ranged reads), the pieces give every
    # line of the file exactly once.
    first = f"{bucket}/corpus/{os.path.basename(local_corpus[0])}"
    pieces = corpus_pieces([first], piece_bytes=4096)
    assert len(pieces) > 10
    assert [t for p in pieces for t in piece_texts(p, "text")] == open(local_corpus[0]).read().split("\n")[:-1]

    # Corpus read from S3, prepared data and checkpoints written there, nothing of it on local disk.
    manifest_text = storage.read_text(f"{bucket}/prepared/manifest.json")
    assert all(f"{bucket}/corpus/{os.path.basename(p)}" in manifest_text for p in local_corpus)
    assert storage.list_files(f"{bucket}/prepared", ".parquet")
    checkpoints = [p for p in storage.list_files(f"{bucket}/checkpoints/train", "trainer_state.json")]
    assert len(checkpoints) == 2, checkpoints  # steps 5 and 10
    assert result.checkpoint_dir.startswith(f"{BUCKET}/checkpoints/train/checkpoint_")
    assert not (run_dir / "data").exists() and not (run_dir / "train").exists()
    AutoModelForCausalLM.from_pretrained(result.export_dir)  # export built from the S3 checkpoint

    # The same command with more steps resumes from the latest S3 checkpoint.
    pretrain(tiny_config(run_dir, "pretrain.max_steps=15", *overrides))
    steps = [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r]
    assert steps == [5, 10, 15]
    out = capfd.readouterr().out
    assert "resumed from" in out
    # One download of the checkpoint per node (here one node of 2 workers), not one per worker.
    downloads = [line for line in out.splitlines() if "downloaded s3://" in line]
    assert len(downloads) == 1 and "for the 2 worker(s) on this node" in downloads[0], downloads

    # Credentials live in the environment only: not in the saved config, not in the logs.
    assert SECRET not in (run_dir / "config.yaml").read_text()
    assert f"{bucket}/checkpoints" in (run_dir / "config.yaml").read_text()
    assert SECRET not in out


def test_a_corpus_of_several_buckets_shuffles_through_the_object_store(ray_with_s3, tmp_path, monkeypatch):
    """Above 64 MiB of text (here 8 KiB) prepare shuffles documents through bucket files beside its output: on S3
    they are written, gathered and deleted like local ones, and the same documents come out."""
    from ptray.data import prepare as prepare_module

    bucket = ray_with_s3
    write_builtin_corpus(str(tmp_path / "corpus"), 300)
    storage.copy_dir(str(tmp_path / "corpus"), f"{bucket}/bucketed-corpus")
    overrides = [f"data.train_files=[{bucket}/bucketed-corpus/*.txt]", "data.builtin_docs=300"]
    whole = prepare_module.prepare(tiny_config(tmp_path / "whole", *overrides))
    monkeypatch.setattr(prepare_module, "PARTITION_BYTES", 8192)
    bucketed = prepare_module.prepare(tiny_config(tmp_path, *overrides, f"data.prepared_dir={bucket}/bucketed"))
    docs = _doc_files(f"{bucket}/bucketed")
    assert len(docs) > 4 and all("/docs/split=" in f for f in docs), docs  # several buckets, none left behind
    assert bucketed.num_docs == whole.num_docs
    assert _texts(docs) == _texts(_doc_files(str(tmp_path / "whole" / "data")))


def _doc_files(prepared_dir: str) -> list[str]:
    return [f for f in storage.list_files(prepared_dir, ".parquet") if "/docs/" in f]


def _texts(files: list[str]) -> list[str]:
    tables = [pq.read_table(inner, columns=["text"], filesystem=fs)
              for fs, inner in map(storage.filesystem_for, files)]
    return sorted(text for table in tables for text in table["text"].to_pylist())


def test_missing_bucket_and_credentials_in_uri_are_clear_errors(ray_with_s3, tmp_path):
    from ptray.pretrain import pretrain

    with pytest.raises(DataError, match=r"run.storage_path='s3://no-such-bucket/ckpt'.*bucket exists"):
        pretrain(tiny_config(tmp_path, "run.storage_path=s3://no-such-bucket/ckpt"))
    with pytest.raises(DataError, match="s3://no-such-bucket/corpus"):
        from ptray.data.prepare import prepare

        prepare(tiny_config(tmp_path, "data.train_files=[s3://no-such-bucket/corpus/*.txt]"))
    with pytest.raises(ConfigError, match="credentials in the URI"):
        tiny_config(tmp_path, "run.storage_path=s3://key:secret@bucket/ckpt")
