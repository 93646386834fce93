"""`prepare` on a real local Ray: mixed formats (one compressed), cleaning, dedup, packing, manifest, and bad input."""

import gzip
import json
import os
import textwrap
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from ptray.data.clean import clean_text
from ptray.data.manifest import read_manifest, verify_shards
from ptray.data.prepare import prepare
from ptray.data.tokenizer import load_tokenizer
from ptray.errors import DataError
from ptray.report import _data_summary

SEQ_LEN = 32


def _docs(n, prefix):
    return [f"{prefix} document {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs." for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    txt = _docs(300, "text") + ["tiny", ""] + _docs(20, "text")  # 20 exact duplicates, one short doc, one blank
    (root / "a.txt").write_text("\n".join(txt) + "\n")
    jsonl = [json.dumps({"body": f"<b>{d}</b>"}) for d in _docs(200, "json")]
    # Two records without usable text (2 of 722, under data.max_bad_fraction): skipped and counted, and a nested
    # value among strings must not break the reader.
    jsonl[50:50] = [json.dumps({"body": {"nested": "not text"}}), json.dumps({"title": "no body field"})]
    with pa.output_stream(str(root / "b.jsonl.gz"), compression="gzip") as f:  # corpora often come compressed
        f.write(("\n".join(jsonl) + "\n").encode())
    pq.write_table(pa.table({"body": _docs(200, "parquet")}), root / "c.parquet")
    return root


@pytest.fixture(scope="module")
def prepared(ray_local, corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (corpus / "a.jsonl").write_text((corpus / "a.txt").read_text())  # not used: we list files explicitly below
    cfg = tiny_config(run, f"data.train_files=[{corpus}/a.txt,{corpus}/b.jsonl.gz,{corpus}/*.parquet]",
                      "data.text_field=body", f"data.seq_len={SEQ_LEN}", "data.vocab_size=400",
                      "data.val_fraction=0.1", "data.rows_per_shard=100", "data.min_chars=10")
    # A version left by an earlier prepare: deleted once the new one is committed
    # (checked in test_failed_prepare_keeps_the_committed_data).
    (run / "data" / "v20000101-000000-abcdef" / "train").mkdir(parents=True)
    # .txt files have no field names: a text line is the document whatever data.text_field says.
    return cfg, prepare(cfg)


def _rows(cfg, manifest, split):
    root = cfg.prepared_dir
    tables = [pq.read_table(p, columns=["input_ids"]) for p in manifest.shard_paths(root, split)]
    return np.concatenate([np.asarray(t["input_ids"].combine_chunks().flatten()).reshape(-1, SEQ_LEN + 1)
                           for t in tables])


def _version_dir(cfg, manifest):
    return f"{cfg.prepared_dir}/{manifest.tokenizer_dir.split('/')[0]}"


def _docs_of(cfg, split):
    manifest = read_manifest(cfg.prepared_dir)
    return pq.read_table(f"{_version_dir(cfg, manifest)}/docs/split={split}", columns=["text"])["text"].to_pylist()


def test_rows_are_exactly_seq_len_plus_one_with_no_padding(prepared):
    cfg, manifest = prepared
    rows = _rows(cfg, manifest, "train")
    assert rows.shape[1] == SEQ_LEN + 1
    assert len(rows) == manifest.num_train_rows > 0
    assert not (rows == manifest.pad_id).any()
    assert len(manifest.train) > 1  # rows_per_shard=100 splits the output into several shards
    assert all(s.num_tokens == s.num_rows * (SEQ_LEN + 1) for s in manifest.train)
    # Full shards of rows_per_shard rows, but for the last of each documents file (one file here), as each file says
    files = manifest.shard_paths(cfg.prepared_dir, "train")
    assert [pq.read_metadata(f).num_rows for f in files] == [s.num_rows for s in manifest.train]
    assert {s.num_rows for s in manifest.train[:-1]} == {100} and 0 < manifest.train[-1].num_rows <= 100


def test_token_count_is_conserved(prepared):
    cfg, manifest = prepared
    tokenizer = load_tokenizer(f"{cfg.prepared_dir}/{manifest.tokenizer_dir}")
    docs = _docs_of(cfg, "train") + _docs_of(cfg, "val")
    expected = sum(len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])  # +1: EOS
    packed = sum(s.num_tokens for s in manifest.train + manifest.val)
    assert manifest.num_doc_tokens == expected
    assert packed + manifest.num_dropped_tokens == expected
    assert manifest.num_dropped_tokens < 0.05 * expected
    assert (_rows(cfg, manifest, "train") == manifest.eos_id).sum() > 0  # documents are EOS-separated


def test_cleaning_dedup_and_disjoint_validation(prepared):
    cfg, manifest = prepared
    train, val = _docs_of(cfg, "train"), _docs_of(cfg, "val")
    assert len(train) + len(val) == 300 + 200 + 200  # duplicates, the short doc and the blank line are gone
    assert len(set(train)) == len(train) and not set(train) & set(val)
    assert 0.04 < len(val) / 700 < 0.2
    assert not any("<b>" in d for d in train + val)  # HTML stripped from the jsonl docs
    assert manifest.num_docs == {"train": len(train), "val": len(val)}
    assert manifest.vocab_size == len(load_tokenizer(f"{cfg.prepared_dir}/{manifest.tokenizer_dir}")) <= 400
    assert len(manifest.source_files) == 3


def test_verify_shards_names_a_corrupt_shard(prepared, tmp_path):
    cfg, manifest = prepared
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cfg.prepared_dir, copy)
    verify_shards(read_manifest(str(copy)), str(copy))
    victim = copy / manifest.train[0].path
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DataError, match=manifest.train[0].path.split("/")[-1]):
        verify_shards(read_manifest(str(copy)), str(copy))


def test_bad_inputs_fail_with_clear_errors(ray_local, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents left after cleaning"):
        prepare(tiny_config(tmp_path / "r1", f"data.train_files=[{tmp_path}/empty.txt]"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        prepare(tiny_config(tmp_path / "r2", f"data.train_files=[{tmp_path}/broken.parquet]"))
    (tmp_path / "other.jsonl").write_text('{"content": "hello there world, long enough"}\n')
    with pytest.raises(DataError, match="no field 'text'.*data.text_field"):
        prepare(tiny_config(tmp_path / "r3", f"data.train_files=[{tmp_path}/other.jsonl]"))
    with pytest.raises(DataError, match="matched no"):
        prepare(tiny_config(tmp_path / "r4", f"data.train_files=[{tmp_path}/nothing/*.txt]"))
    bad = {"latin1.txt": ("caf\xe9 ol\xe9\n".encode("latin-1"), r"latin1.txt line 1 is not UTF-8 text.*iconv"),
           "image.txt": (b"GIF89a\0\0\x80\xff", r"image.txt line 1 holds NUL bytes: a binary file"),
           "torn.jsonl": (b'{"text": "a fine first record"}\n{"text": "cut off\n', r"torn.jsonl line 2 is not JSON"),
           "torn.jsonl.gz": (gzip.compress(b'{"text": "a fine first record"}\n' * 50)[:-30],
                             r"cannot read corpus file \S*torn.jsonl.gz: .*unreadable or corrupt"),
           "mixed.jsonl": (b'{"text": "a fine record here"}\n{"text": ["a", "list"]}\n',
                           r"1 of 2 corpus records have no usable text in field 'text' \(e.g. \S*mixed.jsonl line 2: "
                           r"a list in field 'text'\): more than data.max_bad_fraction=0.01")}
    for name, (content, message) in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            prepare(tiny_config(tmp_path / "r5", f"data.train_files=[{tmp_path}/{name}]"))
    # Many files are scanned in as many tasks as the machine has cores: the bad one is still the one named.
    mixed = tmp_path / "many"
    mixed.mkdir()
    for k in range(5):
        (mixed / f"good{k}.txt").write_text("a perfectly ordinary line of corpus text\n" * 20)
    (mixed / "good3.txt").write_bytes(b"fine\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"good3.txt line 2 is not UTF-8 text"):
        prepare(tiny_config(tmp_path / "r5", f"data.train_files=[{mixed}/*.txt]"))
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    with pytest.raises(DataError, match="column 'text' holds int64, not text"):
        prepare(tiny_config(tmp_path / "r6", f"data.train_files=[{tmp_path}/numbers.parquet]"))
    assert not list(tmp_path.glob("r*/data/*"))  # failed prepares leave nothing behind


def test_failed_prepare_keeps_the_committed_data(prepared, tmp_path):
    cfg, manifest = prepared
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError):
        prepare(tiny_config(cfg.run_dir, f"data.train_files=[{tmp_path}/empty.txt]"))
    assert read_manifest(cfg.prepared_dir) == manifest
    verify_shards(manifest, cfg.prepared_dir)
    import os

    # Only the committed version is left: the earlier one the fixture planted was deleted after the commit.
    assert sorted(os.listdir(cfg.prepared_dir)) == ["manifest.json", manifest.tokenizer_dir.split("/")[0]]


def test_documents_are_shuffled_before_packing(prepared):
    """Packed rows interleave the three source files (issue 11: rows of one file in a row made one-topic batches)."""
    cfg, manifest = prepared
    tokenizer = load_tokenizer(f"{_version_dir(cfg, manifest)}/tokenizer")
    rows = _rows(cfg, manifest, "train")
    sources = [next(k for k in ("text document", "json document", "parquet document", "")
                    if k in tokenizer.decode(row)) for row in rows[:40]]
    switches = sum(a != b for a, b in zip(sources, sources[1:]))
    assert {"text document", "json document", "parquet document"} <= set(sources) and switches >= 10, sources


def test_a_hard_wrapped_book_is_prepared_as_paragraphs(ray_local, tmp_path, capfd):
    """A book-like .txt file (lines filled to 72 columns, blank lines between paragraphs) is read as paragraphs, not
    as line fragments that would be shuffled apart before packing; prepare says so, and data.txt_document=line
    restores the line reading. Beside it, a one-document-per-line file is still read by line."""
    paragraphs = [f"Chapter {i}. " + " ".join(f"the river ran past mill {j} and the town of {i}"
                                              for j in range(i % 9 + 2)) for i in range(150)]
    (tmp_path / "book.txt").write_text("\n\n".join(textwrap.fill(p, 72) for p in paragraphs) + "\n")
    (tmp_path / "lines.txt").write_text("\n".join(_docs(100, "line")) + "\n")
    files = f"data.train_files=[{tmp_path}/book.txt,{tmp_path}/lines.txt]"
    for setting, book_docs in [("auto", paragraphs), ("line", None)]:
        cfg = tiny_config(tmp_path / setting, files, f"data.txt_document={setting}", f"data.seq_len={SEQ_LEN}",
                          "data.vocab_size=400", "data.val_fraction=0.1")
        manifest = prepare(cfg)
        docs = set(_docs_of(cfg, "train") + _docs_of(cfg, "val"))
        assert manifest.settings["data.txt_document"] == setting
        assert set(_docs(100, "line")) <= docs
        if book_docs:
            assert docs - set(_docs(100, "line")) == set(book_docs)
            assert "1 of 2 .txt files look hard-wrapped" in capfd.readouterr().out
        else:  # each line of the book is a document of its own (those under data.min_chars dropped)
            assert not docs & set(paragraphs) and len(docs) > 100 + 2 * len(paragraphs)
            assert "hard-wrapped" not in capfd.readouterr().out


def test_preparing_twice_gives_byte_identical_shards(prepared, tmp_path):
    """Issue 12: two prepares of one corpus and config must give the same rows in the same order (Ray Data's
    parallel writes decided the order before), and the manifest records the shards' hashes."""
    import hashlib

    from ptray import storage

    cfg, manifest = prepared
    again = prepare(tiny_config(cfg.run_dir, *_overrides(cfg), f"data.prepared_dir={tmp_path}/again"))
    assert manifest.content_hash and again.content_hash == manifest.content_hash
    assert [s.sha256 for s in again.train + again.val] == [s.sha256 for s in manifest.train + manifest.val]
    assert again.tokenizer_hash == manifest.tokenizer_hash
    for shard, path in zip(manifest.train, manifest.shard_paths(cfg.prepared_dir, "train")):
        assert storage.sha256(path) == shard.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert np.array_equal(_rows(cfg, manifest, "train"), _rows(tiny_config(
        cfg.run_dir, f"data.prepared_dir={tmp_path}/again", f"data.seq_len={SEQ_LEN}"), again, "train"))


def test_several_hash_partitions_keep_the_same_documents(prepared, tmp_path, monkeypatch):
    """A corpus larger than one partition (64 MiB of text; here 4 KiB) is shuffled through bucket files: duplicates
    still meet and are dropped, exactly the documents of the one-partition path survive, a second prepare gives the
    same shards, and no bucket file is left behind."""
    from ptray.data import prepare as prepare_module

    cfg, manifest = prepared
    monkeypatch.setattr(prepare_module, "PARTITION_BYTES", 4096)
    parts_cfg = tiny_config(cfg.run_dir, *_overrides(cfg), f"data.prepared_dir={tmp_path}/parts")
    parts = prepare(parts_cfg)
    partitions = pq.ParquetDataset(f"{_version_dir(parts_cfg, parts)}/docs/split=train").files
    assert len(partitions) > 5, partitions
    assert parts.num_docs == manifest.num_docs
    for split in ("train", "val"):
        assert sorted(_docs_of(parts_cfg, split)) == sorted(_docs_of(cfg, split))
    assert sorted(os.listdir(f"{_version_dir(parts_cfg, parts)}/docs")) == ["split=train", "split=val"]
    again = prepare(tiny_config(cfg.run_dir, *_overrides(cfg), f"data.prepared_dir={tmp_path}/again"))
    assert again.content_hash == parts.content_hash != manifest.content_hash


def test_packing_reads_the_documents_in_files_of_at_most_docs_per_file(prepared, tmp_path, monkeypatch):
    """Packing runs a task per documents file, each on one thread, so the documents are written in files of at most
    DOCS_PER_FILE: a corpus of one hash partition still packs on every core. The files hold the same documents in the
    same order, every token is packed or counted as dropped, and a second prepare gives the same shards."""
    from ptray.data import prepare as prepare_module

    cfg, manifest = prepared
    per_file = -(-manifest.num_docs["train"] // 5)
    monkeypatch.setattr(prepare_module, "DOCS_PER_FILE", per_file)
    files_cfg = tiny_config(cfg.run_dir, *_overrides(cfg), f"data.prepared_dir={tmp_path}/files")
    split = prepare(files_cfg)
    files = sorted(pq.ParquetDataset(f"{_version_dir(files_cfg, split)}/docs/split=train").files)
    assert len(files) == 5 and {pq.read_metadata(f).num_rows for f in files[:-1]} == {per_file}, files
    assert _docs_of(files_cfg, "train") == _docs_of(cfg, "train")
    assert split.num_doc_tokens == manifest.num_doc_tokens
    packed = sum(s.num_tokens for s in split.train + split.val)
    assert packed + split.num_dropped_tokens == split.num_doc_tokens
    again = prepare(tiny_config(cfg.run_dir, *_overrides(cfg), f"data.prepared_dir={tmp_path}/again"))
    assert again.content_hash == split.content_hash != manifest.content_hash


def test_a_small_corpus_prepared_in_this_process_matches_the_ray_data_jobs(prepared, tmp_path, monkeypatch, capfd):
    """A corpus of one partition on one machine is prepared in the driver (Ray Data's jobs cost more to start than its
    work); switched off, the same corpus runs as Ray Data jobs. Both write the same documents in the same files (here
    of 200 documents each) and the same shards."""
    from ptray.data import prepare as prepare_module

    cfg, _ = prepared
    monkeypatch.setattr(prepare_module, "DOCS_PER_FILE", 200)
    manifests, docs = {}, {}
    for in_driver in (True, False):
        monkeypatch.setattr(prepare_module, "IN_DRIVER", in_driver)
        run_cfg = tiny_config(cfg.run_dir, *_overrides(cfg), f"data.prepared_dir={tmp_path}/{in_driver}")
        manifests[in_driver] = prepare(run_cfg)
        assert ("prepared in this process" in capfd.readouterr().out) == in_driver
        files = sorted(pq.ParquetDataset(f"{_version_dir(run_cfg, manifests[in_driver])}/docs/split=train").files)
        docs[in_driver] = [pq.read_table(f, columns=["text", "doc_hash"]).to_pydict() for f in files]
    assert len(docs[True]) == -(-manifests[True].num_docs["train"] // 200) > 1 and docs[True] == docs[False]
    assert manifests[True].content_hash == manifests[False].content_hash
    assert manifests[True].num_docs == manifests[False].num_docs
    assert manifests[True].num_dropped_tokens == manifests[False].num_dropped_tokens > 0


def _overrides(cfg):
    d = cfg.data
    return [f"data.train_files=[{','.join(d.train_files)}]", f"data.text_field={d.text_field}",
            f"data.seq_len={d.seq_len}", f"data.vocab_size={d.vocab_size}", f"data.val_fraction={d.val_fraction}",
            f"data.rows_per_shard={d.rows_per_shard}", f"data.min_chars={d.min_chars}"]


def test_a_given_tokenizer_is_used_as_it_is(prepared, tmp_path):
    """data.tokenizer_path: the corpus is tokenized with that tokenizer (no training; data.vocab_size is ignored)."""
    cfg, manifest = prepared
    given = f"{_version_dir(cfg, manifest)}/tokenizer"
    again = prepare(tiny_config(tmp_path, *_overrides(cfg), f"data.tokenizer_path={given}", "data.vocab_size=999"))
    assert again.tokenizer_hash == manifest.tokenizer_hash and again.vocab_size == manifest.vocab_size
    assert again.content_hash == manifest.content_hash  # the same tokenizer on the same corpus: the same rows


def test_a_one_file_corpus_prepares_without_library_warnings(ray_local, corpus, tmp_path, monkeypatch):
    """One small file is one reading task: asking Ray Data for a task per core anyway makes it print a UserWarning
    on the user's console ("The maximum number of concurrent tasks ... is set to 2, but the operator only received 1
    input(s)"). (A corpus this small is prepared in the driver; here it runs as Ray Data jobs.)"""
    from ptray.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "IN_DRIVER", False)
    cfg = tiny_config(tmp_path, f"data.train_files=[{corpus}/a.txt]", f"data.seq_len={SEQ_LEN}", "data.vocab_size=400",
                      "data.min_chars=10")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = prepare(cfg)
    assert manifest.num_docs["train"] > 0
    assert not [f"{w.category.__name__}: {w.message}" for w in caught]


def _real_docstrings() -> list[str]:
    """Real English text that every Python ships: the standard library's longer docstrings, one line each."""
    import importlib
    import inspect

    modules = ("os re json collections itertools functools string textwrap pathlib argparse logging subprocess "
               "inspect asyncio email.message http.client urllib.request unittest decimal fractions statistics "
               "datetime calendar csv sqlite3 zipfile tarfile shutil tempfile socket threading multiprocessing "
               "concurrent.futures contextlib dataclasses enum abc io pickle copy heapq bisect random math").split()
    docs = {}
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module] + [getattr(module, n) for n in dir(module) if not n.startswith("_")]:
            members = [getattr(obj, a, None) for a in dir(obj) if not a.startswith("_")] if inspect.isclass(obj) else []
            for member in [obj] + members:
                text = " ".join((inspect.getdoc(member) or "").split()) if member is not None else ""
                if len(text.split()) >= 60:
                    docs.setdefault(text, None)
    return sorted(docs)


def _shingles(text: str, k: int = 5) -> set:
    words = text.split()
    return {" ".join(words[i: i + k]) for i in range(max(1, len(words) - k + 1))}


def test_minhash_removes_planted_near_duplicates(ray_local, tmp_path):
    """data.dedup=minhash on real text with planted near-copies (one word changed, or a sentence added): measured
    against the exact Jaccard similarity of every pair, near-duplicate clusters are cut to one document each."""
    originals = _real_docstrings()
    assert len(originals) > 300
    planted = []
    for i, doc in enumerate(d for d in originals if len(d.split()) >= 90):
        words = doc.split()
        if i % 3 == 0:
            words[len(words) // 2] = "altered"
        elif i % 3 == 1:
            words += ["This", "sentence", "was", "added."]
        else:
            continue
        planted.append(" ".join(words))
    cfg = tiny_config(tmp_path / "run", f"data.train_files=[{tmp_path}/docs.txt]", "data.dedup=minhash",
                      "data.val_fraction=0.1", "data.vocab_size=400", "data.min_chars=10")
    d = cfg.data  # cleaned beforehand, so a document's text is the same before and after prepare
    corpus = list(dict.fromkeys(clean_text(doc, normalize_unicode=d.normalize_unicode, strip_html=d.strip_html,
                                           collapse_whitespace=d.collapse_whitespace) for doc in originals + planted))
    (tmp_path / "docs.txt").write_text("\n".join(corpus) + "\n")
    manifest = prepare(cfg)
    kept = set(_docs_of(cfg, "train") + _docs_of(cfg, "val"))
    removed = set(corpus) - kept
    assert manifest.num_near_duplicates == len(removed) and manifest.settings["data.dedup"] == "minhash"

    # The truth: clusters of documents whose exact shingle Jaccard similarity reaches the threshold.
    sets = [_shingles(d) for d in corpus]
    parent = list(range(len(corpus)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    near_any = set()  # documents with a partner at least 0.7 similar: not a mistake to drop near the threshold
    for i in range(len(corpus)):
        for j in range(i + 1, len(corpus)):
            similarity = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if similarity >= 0.7:
                near_any |= {corpus[i], corpus[j]}
            if similarity >= 0.8:
                parent[root(j)] = root(i)
    clusters = {}
    for i, doc in enumerate(corpus):
        clusters.setdefault(root(i), []).append(doc)
    should_drop = sum(len(c) - 1 for c in clusters.values())
    dropped_right = sum(min(len(set(c) & removed), len(c) - 1) for c in clusters.values())
    precision = len(removed & near_any) / max(1, len(removed))
    recall = dropped_right / should_drop
    print(f"MinHash near-duplicates: {len(planted)} planted among {len(originals)} docstrings; {should_drop} to drop "
          f"(exact Jaccard >= 0.8), {len(removed)} dropped: precision {precision:.3f}, recall {recall:.3f}")
    assert len(planted) >= 50 and precision >= 0.95 and recall >= 0.9
    lost = [c for c in clusters.values() if not set(c) & kept]
    assert not lost  # no cluster loses every copy
    summary = " ".join(_data_summary(str(tmp_path / "run")))  # the report's data section says how many
    assert f"{len(removed):,} near-duplicate documents dropped (MinHash, similarity >= 0.8)" in summary


def test_the_local_session_hands_its_settings_to_workers_through_their_environment(ray_local):
    """Local mode gives Ray no job runtime_env (with one, none of the workers Ray prestarts can be used, and every
    first task waits for a new process): the settings and the quieting hook reach the workers through the
    environment they inherit, and the driver's own environment is left as it was."""
    import logging
    import os

    import ray

    from ptray.worker_setup import drop_trial_stop_race

    def worker_view():
        controller = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
        cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
        filters = [getattr(f, "__name__", "") for f in controller.filters]
        return (os.environ.get("DS_ACCELERATOR"), os.environ.get("RAY_ADDRESS"), cleaner.level,
                drop_trial_stop_race.__name__ in filters)

    assert ray.get_runtime_context().runtime_env == {}
    accelerator, address, cleaner_level, filtered = ray.get(ray.remote(worker_view).remote())
    assert accelerator == "cpu" and address == ray.get_runtime_context().gcs_address
    assert cleaner_level == logging.ERROR and filtered
    assert "RAY_ADDRESS" not in os.environ and "RAY_GCS_SERVER_PORT" not in os.environ

    def record(message):
        return logging.LogRecord("controller", logging.ERROR, __file__, 1, message, None, None)

    stopped = ("Error in control loop iteration: The actor died unexpectedly before finishing this task.\n\t"
               "class_name: _QueueActor\nThe actor is dead because its owner has died.")
    assert not drop_trial_stop_race(record(stopped))
    removed = stopped.replace("its owner has died", "its worker process has died. Worker exit type: "
                              "INTENDED_SYSTEM_EXIT Worker exit detail: Destroying worker since its placement group "
                              "was removed")
    assert not drop_trial_stop_race(record(removed))
    assert drop_trial_stop_race(record("Error in control loop iteration: worker group failed"))


def test_a_local_session_runs_many_processes_without_raylet_warnings(ray_local, capfd):
    """A sweep runs trials side by side, each with a controller and its workers, beside the workers Ray prestarts.
    Ray caps the raylet's start-up concurrency at the cores and warns on the console once 4x as many worker processes
    are alive ("WARNING: 8 PYTHON worker processes have been started ..."): local mode raises it to its logical CPUs."""
    import time

    import ray

    @ray.remote(num_cpus=0)
    class Idle:
        def pid(self) -> int:
            return os.getpid()

    actors = [Idle.remote() for _ in range(16)]  # with Ray's cap of 2 on 2 cores, 16 live workers printed it
    assert len(set(ray.get([a.pid.remote() for a in actors]))) == 16
    time.sleep(2)  # the raylet's warning reaches the driver's console asynchronously
    assert "worker processes have been started" not in "".join(capfd.readouterr())
    for actor in actors:
        ray.kill(actor)


SUMMARY_AFTER_WORKER_LINES = """
import sys, types
import ray
import ptray.pipeline
from ptray.cli import main

@ray.remote(num_cpus=0)
def log_step():
    print("step 62/62 | loss 1.0", flush=True)

def last_stage(cfg):  # a stage's workers log the same line: Ray prints the first, and holds the repeats back
    ray.get([log_step.remote() for _ in range(4)])
    return {"pretrain": types.SimpleNamespace(export_dir="E"), "report": "R", "run_dir": "D",
            "sweep": types.SimpleNamespace(leaderboard="L", best_dir="B", best={"metric": "m", "value": 1.0})}

ptray.pipeline.pipeline = last_stage
sys.exit(main(["pipeline", "--config", "tiny", "run.dir=" + sys.argv[1]]))
"""


def test_the_pipelines_summary_closes_the_console_after_the_workers_late_lines(tmp_path):
    """Ray prints a repeated worker line once and the repeats later, at the latest when the session closes
    ("[repeated 3x across cluster]"): the main job's summary was followed by six such lines. The CLI prints it after
    the session has closed. (The stages are replaced by one that logs as workers do: the order is the CLI's.)"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SUMMARY_AFTER_WORKER_LINES, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 62/62 | loss 1.0" in proc.stdout
    closing = proc.stdout[proc.stdout.index("[pipeline] done"):]
    assert "step 62/62" not in closing, proc.stdout
