"""Pure functions: cleaning, packing, masking, schedules, file expansion, tokenizer training. No Ray."""

import glob
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import free_port
from ptray.config import load_config
from ptray.data import clean
from ptray.data.clean import clean_batch, clean_text, is_validation, shuffle_order
from ptray.data.pack import encode_documents, pack_rows
from ptray.data.readers import corpus_pieces, expand_files, piece_texts
from ptray.data.stream import check_sources, source_texts
from ptray.data.tokenizer import end_of_document_id, fast_tokenizer, load_tokenizer, train_bpe
from ptray.errors import ConfigError, DataError
from ptray.objectives import IGNORE_INDEX, causal_lm_batch, masked_lm_batch
from ptray.schedule import pretrain_schedule


def test_clean_text_stages_can_be_switched():
    raw = "<p>Caf\u00e9 \uff21  &amp;\n\n  tea</p>"
    assert clean_text(raw, normalize_unicode=True, strip_html=True, collapse_whitespace=True) == "Café A &\n\ntea"
    assert clean_text(raw, normalize_unicode=False, strip_html=False, collapse_whitespace=False) == raw


@pytest.mark.parametrize("text", ["if (a < b && c > d) return x;", "std::vector<int> v; #include <stdio.h>",
                                  "0 < x < 1 and y > 2", "see https://example.com/?a=1&para=2 for details",
                                  "first paragraph\n\nsecond paragraph,\nwith a line break"])
def test_cleaning_keeps_code_maths_urls_and_paragraphs(text):
    assert clean_text(text, normalize_unicode=True, strip_html=True, collapse_whitespace=True) == text


def test_cleaning_removes_real_markup_and_extra_spacing():
    raw = '<!-- nav --><DIV class="x">A &lt;tag&gt;  and\ttabs</div>\n \n\n\n<br/>next  line \nend'
    assert clean_text(raw, normalize_unicode=True, strip_html=True, collapse_whitespace=True) == \
        "A <tag> and tabs\n\nnext line\nend"


def test_whitespace_collapse_matches_the_plain_rule_on_every_kind_of_space():
    """The spelled-out pattern (faster) collapses exactly what `[^\\S\\n]+ -> " "` would: every whitespace character
    Python knows except the newline, in any run, at any place."""
    inline = {chr(c) for c in range(0x110000) if chr(c).isspace()} - {"\n"}
    assert {ch for ch in inline if clean.re.fullmatch(f"[{clean._INLINE_SPACE}]", ch)} == inline
    plain = clean.re.compile(r"[^\S\n]+")
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\t", "\r", "\x0b", "\xa0", "\u2003", "\u3000", "\x85", "\u200b", "x y"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert clean._SPACES.sub(" ", text) == plain.sub(" ", text), repr(text)


def test_clean_batch_drops_short_docs_and_splits_by_hash():
    batch = {"text": np.array(["short", "a long enough document here", "a long enough document here"], dtype=object)}
    out = clean_batch(batch, normalize_unicode=True, strip_html=True, collapse_whitespace=True, min_chars=10,
                      val_fraction=0.5, seed=0)
    assert list(out["text"]) == ["a long enough document here"] * 2
    assert out["split"][0] == out["split"][1]  # duplicates always share a split
    assert len(shuffle_order(out["doc_hash"], dedup=True, seed=0)) == 1
    assert len(shuffle_order(out["doc_hash"], dedup=False, seed=0)) == 2


def test_shuffle_order_orders_documents_by_a_seeded_key_whatever_their_input_order():
    texts = np.array([f"document number {i}" for i in range(50)], dtype=object)
    batch = clean_batch({"text": texts}, normalize_unicode=True, strip_html=True, collapse_whitespace=True,
                        min_chars=1, val_fraction=0.0, seed=0)
    reversed_batch = {k: v[::-1] for k, v in batch.items()}

    def shuffled(batch, seed):
        return list(batch["text"][shuffle_order(batch["doc_hash"], dedup=True, seed=seed)])
    once = shuffled(batch, seed=3)
    assert once == shuffled(reversed_batch, seed=3)  # input order does not matter
    assert once != list(texts) and once != shuffled(batch, seed=4)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_corpus_pieces_cut_anywhere_read_every_record_exactly_once(tmp_path, suffix):
    """prepare reads files in byte ranges in parallel: wherever the cuts fall (inside a line, on a newline, on an
    empty line, at the last byte of a file without a final newline), the pieces together give the file's records in
    order, each once."""
    rng = random.Random(0)
    records = [" ".join("word" for _ in range(rng.randrange(1, 30))) + f" {i} é" for i in range(200)]
    lines = [json.dumps({"text": r}) if suffix == ".jsonl" else r for r in records]
    for i in (5, 6, 50):
        lines.insert(i, "")  # blank lines are no records
    path = tmp_path / f"corpus{suffix}"
    path.write_text("\n".join(lines))  # no final newline
    size = path.stat().st_size
    for piece_bytes in [1, 2, 3, 7, 64, 1000, size - 1, size, size + 1]:
        pieces = corpus_pieces([str(path)], piece_bytes=piece_bytes)
        assert pieces[0]["start"] == 0 and pieces[-1]["end"] == size
        assert all(a["end"] == b["start"] for a, b in zip(pieces, pieces[1:]))
        assert [t for p in pieces for t in piece_texts(p, "text")] == records, piece_bytes


def _wrapped(documents: list[str], width: int = 72) -> str:
    """Documents as hard-wrapped prose: lines filled to `width`, a blank line between paragraphs."""
    return "\n\n".join(textwrap.fill(d, width) for d in documents) + "\n"


def _prose(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the of a tool that reads files and writes data to disk for every user on é system".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(3, 90))) + f" {i}." for i in range(n)]


def test_hard_wrapped_paragraphs_are_documents_wherever_the_pieces_are_cut(tmp_path):
    """A hard-wrapped .txt file (data.txt_document=paragraph, or auto on such a file) gives one document per
    paragraph, its lines joined by spaces: read whole or in byte ranges cut anywhere (inside a line, on a blank line,
    inside a run of blank lines), each paragraph once and in order. Windows line ends, whitespace-only lines and a
    missing final newline change nothing."""
    paragraphs = _prose(40)
    text = _wrapped(paragraphs).replace("\n\n", "\n  \n\n", 7).replace("\n", "\r\n", 100).rstrip()
    path = tmp_path / "book.txt"
    path.write_bytes(text.encode())
    size = path.stat().st_size
    for setting in ("auto", "paragraph"):
        for piece_bytes in [1, 2, 7, 64, 1000, size // 3, size - 1, size, size + 1]:
            pieces = corpus_pieces([str(path)], piece_bytes=piece_bytes, txt_document=setting)
            assert [t for p in pieces for t in piece_texts(p, "text", setting)] == paragraphs, (setting, piece_bytes)
    lines = [line.strip() for line in text.split("\n") if line.strip()]  # what data.txt_document=line reads
    assert [t.strip() for t in piece_texts(corpus_pieces([str(path)])[0], "text", "line")] == lines
    whole = corpus_pieces([str(path)], piece_bytes=64, txt_document="file")
    assert len(whole) == 1 and list(piece_texts(whole[0], "text", "file")) == [text]
    # data.ingest=ray_data reads a file the same way
    assert list(source_texts(str(path), "text")) == paragraphs
    assert list(source_texts(str(path), "text", "file")) == [text]


def test_auto_reads_hard_wrapped_prose_by_paragraph_and_anything_else_by_line(tmp_path, capsys):
    """data.txt_document=auto: paragraphs for prose wrapped at any usual width (and a README with a list); lines for
    one document per line, also when some lines are blank, when documents are short, or when they are separated by
    blank lines (each paragraph is then one line anyway)."""
    docs = _prose(400, seed=1)
    cases = {
        "wrapped72": (_wrapped(docs), "paragraph"),
        "wrapped40": (_wrapped(docs, 40), "paragraph"),
        "wrapped100": (_wrapped(docs, 100), "paragraph"),
        "readme": (_wrapped(docs[:20]) + "\nOptions:\n* -a all\n* -v verbose output\n\n" + _wrapped(docs[20:40]),
                   "paragraph"),
        "per_line": ("\n".join(docs) + "\n", "line"),
        "per_line_some_blank": ("\n".join(d if i % 9 else "\n" + d for i, d in enumerate(docs)) + "\n", "line"),
        "short_per_line": ("\n".join(d[:60] for d in docs) + "\n", "line"),
        "blank_separated": ("\n\n".join(docs) + "\n", "line"),
    }
    for name, (text, unit) in cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        expected = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()] if unit == "paragraph" else \
            [line for line in text.split("\n") if line.strip()]
        assert list(source_texts(str(path), "text")) == expected, name
    check_sources([str(tmp_path / "wrapped72.txt"), str(tmp_path / "per_line.txt")], "text")  # data.ingest=ray_data
    assert "1 of 2 .txt files look hard-wrapped (e.g. " + str(tmp_path / "wrapped72.txt") in capsys.readouterr().out


@pytest.mark.parametrize("codec, suffix", [("gzip", ".gz"), ("bz2", ".bz2"), ("zstd", ".zst"), ("lz4", ".lz4")])
def test_compressed_corpus_files_read_like_plain_ones(tmp_path, codec, suffix):
    """corpus.jsonl.gz, book.txt.zst: decompressed as they stream, each read whole by one piece (a compressed stream
    has no byte ranges), by both ingest modes, a hard-wrapped one still by paragraph; the scan counts the text's bytes,
    not the file's (prepare sizes its hash partitions by it). A Parquet file compresses inside: parquet.gz is no
    corpus file."""
    import pyarrow as pa

    from ptray.data.readers import _scan_file

    records = _prose(300, seed=2)
    contents = {"corpus.jsonl": ("\n".join(json.dumps({"text": r}) for r in records) + "\n", records),
                "book.txt": (_wrapped(records), records),
                "lines.txt": ("\n".join(records) + "\n", records)}
    for name, (text, expected) in contents.items():
        path = str(tmp_path / (name + suffix))
        with pa.output_stream(path, compression=codec) as f:
            f.write(text.encode())
        pieces = corpus_pieces([path], piece_bytes=64)
        assert len(pieces) == 1 and [t for p in pieces for t in piece_texts(p, "text")] == expected, name
        assert list(source_texts(path, "text")) == expected, name
        scan = _scan_file(path, "text")
        assert not scan["error"] and scan["bytes"] == len(text.encode()) > 2 * os.path.getsize(path), name
    (tmp_path / "table.parquet.gz").write_bytes(b"")
    assert [os.path.basename(f) for f in expand_files([str(tmp_path)])] == [
        f"book.txt{suffix}", f"corpus.jsonl{suffix}", f"lines.txt{suffix}"]
    torn = tmp_path / f"torn.txt{suffix}"
    torn.write_bytes((tmp_path / f"lines.txt{suffix}").read_bytes()[:-40])
    assert "The file is unreadable or corrupt" in _scan_file(str(torn), "text")["error"]


def test_validation_split_fraction_is_respected():
    held_out = sum(is_validation(h, 0.1, seed=3) for h in range(-5000, 5000))
    assert 800 < held_out < 1200


def test_pack_conserves_tokens_and_rows_are_exact(tmp_path):
    texts = ["the cat sat on the mat", "", "a dog", "the cat and the dog sat " * 5, "mat"]
    train_bpe(iter(texts * 20), vocab_size=300, out_dir=str(tmp_path / "tok"))
    hf = load_tokenizer(str(tmp_path / "tok"))
    eos = end_of_document_id(hf)
    flat = encode_documents(fast_tokenizer(str(tmp_path / "tok")), texts, eos)
    # The same ids transformers gives, each document followed by the end-of-document token (an empty one too).
    assert flat.dtype == np.int32
    assert flat.tolist() == [t for text in texts for t in hf(text)["input_ids"] + [eos]]
    rows, tail = pack_rows(flat, row_len=9)
    assert rows.shape == (len(flat) // 9, 9) and len(tail) == len(flat) % 9
    assert np.concatenate([rows.ravel(), tail]).tolist() == flat.tolist()


def test_packing_tasks_tokenize_on_one_thread(tmp_path, monkeypatch):
    """Ray runs a packing task per core; on the tokenizer's own threads as well they oversubscribed the cores (4 files
    in 2 processes on 2 cores: 50.0 s, 34.3 s on one thread each). The setting is the task's, not the process's."""
    from ptray.data import pack

    texts = ["the cat sat on the mat", "a dog", "the cat and the dog sat " * 5]
    train_bpe(iter(texts * 20), vocab_size=300, out_dir=str(tmp_path / "tok"))
    seen, encode = [], pack.encode_documents
    monkeypatch.setattr(pack, "encode_documents",
                        lambda *args: seen.append(os.environ.get("TOKENIZERS_PARALLELISM")) or encode(*args))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    rows, doc_tokens, dropped = pack.tokenize_and_pack(np.array(texts, dtype=object),
                                                       tokenizer_dir=str(tmp_path / "tok"), eos_id=0, seq_len=8)
    assert seen == ["false"] and os.environ["TOKENIZERS_PARALLELISM"] == "true"
    pack.tokenize_and_pack(np.array(texts, dtype=object), tokenizer_dir=str(tmp_path / "tok"), eos_id=0, seq_len=8,
                           one_thread=False)  # the only file to pack: the tokenizer's threads
    assert seen == ["false", "true"]
    flat = encode(fast_tokenizer(str(tmp_path / "tok")), texts, 0)
    assert doc_tokens == len(flat) and rows.shape == (len(flat) // 9, 9) and dropped == len(flat) % 9
    assert np.array_equal(rows.ravel(), flat[: rows.size])


def test_a_file_that_would_set_the_pace_on_one_thread_keeps_the_tokenizers_threads():
    from ptray.data.prepare import tokenize_on_one_thread

    assert tokenize_on_one_thread([5_000], cores=2) == [False]  # the only file
    assert tokenize_on_one_thread([97, 3], cores=2) == [False, True]  # a train file and a small validation file
    assert tokenize_on_one_thread([50, 50], cores=2) == [True, True]  # a core each
    assert tokenize_on_one_thread([25] * 4 + [2], cores=2) == [True] * 5
    assert tokenize_on_one_thread([30, 30, 40], cores=16) == [False] * 3  # fewer files than cores
    assert tokenize_on_one_thread([97, 3], cores=None) == [True, True]  # a cluster: a task per file, one thread each


def test_causal_batch_shifts_targets():
    rows = torch.arange(10).view(2, 5)
    inputs, targets = causal_lm_batch(rows)
    assert torch.equal(inputs, rows[:, :-1]) and torch.equal(targets, rows[:, 1:])


def test_masked_lm_follows_bert_recipe():
    rows = torch.randint(10, 1000, (64, 257))
    rows[:, ::7] = 0  # special tokens are never masked
    inputs, targets = masked_lm_batch(rows, mask_id=3, vocab_size=1000, probability=0.15, special_ids=[0],
                                      generator=torch.Generator().manual_seed(0))
    original = rows[:, :-1]
    chosen = targets != IGNORE_INDEX
    assert 0.12 < chosen.float().mean() < 0.16
    assert not chosen[original == 0].any()
    assert torch.equal(targets[chosen], original[chosen])
    masked = (inputs == 3) & chosen
    unchanged = (inputs == original) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert 0.07 < unchanged.sum() / chosen.sum() < 0.14  # 10% kept + random tokens that happen to match
    assert torch.equal(inputs[~chosen], original[~chosen])


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule):
    p = pretrain_schedule(load_config("tiny", ["pretrain.max_steps=100", "pretrain.warmup_steps=10", "pretrain.lr=1.0",
                                               "pretrain.min_lr_ratio=0.1", f"pretrain.schedule={schedule}",
                                               "pretrain.decay_fraction=0.2"]))
    lrs = [p.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    if schedule == "cosine":
        assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and lrs[50] < 1.0
    if schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[99] == pytest.approx(0.1 + 0.9 / 20, abs=1e-6)
    if schedule == "constant":
        assert lrs[-1] == 1.0


def test_warmup_ratio_follows_max_steps_and_warmup_steps_overrides_it():
    def warmup(*overrides):  # (warm-up steps, lr of the first step, lr of the last warm-up step) at peak lr 1
        p = pretrain_schedule(load_config("tiny", ["pretrain.lr=1.0", *overrides]))
        return p.warmup_steps, p.lr_at(0), p.lr_at(max(p.warmup_steps - 1, 0))

    assert warmup() == (15, pytest.approx(1 / 15), pytest.approx(1.0))  # tiny: 5% of its 300 steps
    assert warmup("pretrain.max_steps=1500") == (75, pytest.approx(1 / 75), pytest.approx(1.0))  # not 15 of 1,500
    assert warmup("pretrain.max_steps=1500", "pretrain.warmup_steps=100")[:2] == (100, pytest.approx(1 / 100))
    assert warmup("pretrain.warmup_ratio=0") == (0, 1.0, 1.0)  # both 0: no warm-up
    with pytest.raises(ConfigError, match="pretrain.warmup_ratio"):
        load_config("tiny", ["pretrain.warmup_ratio=1.5"])


def test_expand_files_globs_dirs_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / "sub" / "notes.md").write_text("ignored")
    assert [os.path.basename(f) for f in expand_files([str(tmp_path)])] == ["a.txt", "b.jsonl"]
    assert len(expand_files([str(tmp_path / "*.txt")])) == 1
    with pytest.raises(DataError, match=r"matched no .* files"):
        expand_files([str(tmp_path / "missing" / "*.txt")])


def test_trained_tokenizer_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = [f"the {w} sat on the mat number {i}" for i in range(300) for w in ("cat", "dog")]
    train_bpe(iter(texts), vocab_size=300, out_dir=str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.eos_token == "<|endoftext|>" and tok.mask_token_id is not None
    ids = tok("the cat sat")["input_ids"]
    assert tok.decode(ids) == "the cat sat"
    assert len(tok) <= 300
    assert load_tokenizer(str(tmp_path / "tok")).eos_token_id == tok.eos_token_id


def test_a_tokenizer_without_pad_token_pads_with_eos_for_classification(tmp_path):
    # GPT-2's own tokenizer has no pad token; classification batches must still pad (with EOS, as in transformers).
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ptray.config import load_config
    from ptray.finetune import _encode_classification, _encode_sft

    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "gpt2ish")
    tokenizer = load_tokenizer(str(tmp_path / "gpt2ish"))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    ft = load_config("tiny", ["finetune.max_len=4"]).finetune
    encoded, lengths = _encode_classification([{"text": "a b", "label": "x"}, {"text": "b", "label": "y"}],
                                              tokenizer, ft, {"x": 0, "y": 1})
    assert lengths == [2, 1]  # before padding: what the warning about cut examples counts
    sft, sft_lengths = _encode_sft([{"prompt": "a b", "response": "b a"}], tokenizer,
                                   load_config("tiny", ["finetune.task=sft", "finetune.max_len=3"]).finetune)
    assert sft["input_ids"].tolist() == [[1, 2, 2]] and sft_lengths == [5]  # prompt 2 + response 2 + EOS, cut to 3
    assert encoded["input_ids"].tolist() == [[1, 2, 0, 0], [2, 0, 0, 0]]
    assert encoded["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("device_name,peak", [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                              ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                              ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA L40S", 362e12),
                                              ("NVIDIA L4", 121e12)])
def test_gpu_peak_flops_by_exact_device_name(monkeypatch, device_name, peak):
    from ptray import metrics

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device_name)
    monkeypatch.setattr(metrics, "measured_matmul_flops", lambda *a, **k: 1.0)
    flops, source = metrics.peak_flops_per_worker(use_gpu=True)
    assert flops == peak and device_name in source and "datasheet" in source
    assert metrics.peak_flops_per_worker(use_gpu=True, configured=5e14) == (5e14, "pretrain.peak_flops_per_worker")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 Future Edition")
    flops, source = metrics.peak_flops_per_worker(use_gpu=True)  # unknown variant: measured, and says how to override
    assert flops == 1.0 and "pretrain.peak_flops_per_worker" in source


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_middle_line_is_an_error(tmp_path):
    from ptray.metrics import MetricsLog, read_metrics

    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert read_metrics(tmp_path) == rows  # killed mid-write: the half row is ignored
    log = MetricsLog(str(tmp_path), resume_step=2)  # resume rewrites the file without it, then appends
    log.write({"step": 3, "loss": 1.2})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_metrics(tmp_path)


def test_a_sweep_trial_must_fit_beside_its_own_cpu_share():
    # Issue 12: on a 2-CPU head, 2 workers x 1 CPU fit, but not beside the trial's own 0.01 CPU: Ray waited forever.
    from ptray.session import placeable_workers

    head = [{"CPU": 2.0}]
    assert placeable_workers(head, {"CPU": 1.0}, "PACK") == 2
    assert placeable_workers(head, {"CPU": 1.0}, "PACK", driver_cpus=0.01) == 1
    assert placeable_workers(head, {"CPU": 0.9}, "PACK", driver_cpus=0.01) == 2
    two_nodes = [{"CPU": 2.0}, {"CPU": 1.0}]  # the trial takes its share where it costs no worker
    assert placeable_workers(two_nodes, {"CPU": 1.0}, "PACK", driver_cpus=0.01) == 2
    assert placeable_workers(two_nodes, {"CPU": 1.0}, "STRICT_PACK", driver_cpus=0.01) == 2
    assert placeable_workers(two_nodes, {"CPU": 1.0, "GPU": 1.0}, "PACK") == 0


def test_checkpoint_rng_holds_every_cuda_device_state(monkeypatch, tmp_path):
    # No GPU here: CUDA's RNG calls are stood in for, to check the states are saved and restored with the CPU one.
    from ptray.checkpoint import load_rng, save_rng

    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    torch.manual_seed(5)
    save_rng(str(tmp_path), rank=1, node_id="n")
    expected = torch.rand(3)
    torch.manual_seed(6)
    assert load_rng(str(tmp_path), rank=1) and not load_rng(str(tmp_path), rank=0)
    assert torch.equal(torch.rand(3), expected)
    assert [t.tolist() for t in restored] == [[1, 2], [3, 4]]


def _shared_check_worker(rank, root, store, results):
    import torch.distributed as dist

    from ptray.errors import UserError
    from ptray.loop import check_shared

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    # One shared directory, then "another node": rank 1 sees a different directory at the same path.
    for case, path in (("shared", f"{root}/a"), ("not shared", f"{root}/{'ab'[rank]}")):
        try:
            check_shared(path, rank, 2, node_id=f"node-{rank}")
            results[(case, rank)] = "ok"
        except UserError as e:
            results[(case, rank)] = str(e)
    dist.destroy_process_group()


def test_checkpoint_directory_must_be_shared_by_every_node(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_shared_check_worker, args=(str(tmp_path), str(tmp_path / "store"), results), nprocs=2)
    assert results[("shared", 0)] == results[("shared", 1)] == "ok"
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".ptray-shared")]  # the token is removed
    for rank in (0, 1):  # every rank stops, naming the node that cannot see rank 0's files
        assert "is not shared between the nodes: workers on node(s) node-1" in results[("not shared", rank)]


@pytest.mark.parametrize("pretrained,scratch,verdict", [(0.5453, 0.5440,
                                                         "no clear difference (within the noise, ±0.05"),
                                                        (0.66, 0.54, "Pretraining helped"),
                                                        (0.50, 0.62, "Pretraining hurt")])
def test_the_verdict_names_a_gain_only_beyond_validation_noise(pretrained, scratch, verdict):
    # One seed per side shows no spread; 750 validation examples still put ~±0.05 of sampling noise on a difference.
    from ptray.config import load_config
    from ptray.sweep import summarize

    cfg = load_config("tiny", ["sweep.num_seeds=0", "sweep.label_fractions=[1.0]", "sweep.pretrained_steps=[]"])
    sides = {side: {"winner": {"best_metric": value, "trial_id": side, "config": {}}}
             for side, value in (("pretrained", pretrained), ("scratch", scratch))}
    summary = summarize(cfg, sides, followups=[], num_val=750)
    assert verdict in summary["verdict"] and "as its search found it" in summary["verdict"]


def test_each_label_fraction_gets_its_own_plain_verdict():
    # The check's run: no difference with all labels, 12 points with a tenth of them; 3 points at 30% is noise.
    from ptray.config import load_config
    from ptray.sweep import summarize

    cfg = load_config("tiny", ["sweep.num_seeds=0", "sweep.label_fractions=[0.1,0.3,1.0]", "sweep.pretrained_steps=[]"])
    points = {"pretrained": (0.717, 0.644, 0.60), "scratch": (0.714, 0.523, 0.57)}
    sides = {side: {"winner": {"best_metric": full, "trial_id": side, "config": {}}} for side, (full, _, _) in
             points.items()}
    followups = [{"side": side, "kind": "fraction", "fraction": fraction, "value": value, "trial_id": f"{side}{k}"}
                 for side, values in points.items() for k, (fraction, value) in enumerate(zip((0.1, 0.3), values[1:]))]
    summary = summarize(cfg, sides, followups, num_val=750)
    assert summary["verdict"].startswith("Pretraining made no clear difference")
    assert summary["label_verdicts"]["0.1"] == ("With 10% of the labels, pretraining helped: val_accuracy 0.6440 from "
                                               "the pretrained model vs 0.5230 from scratch (+0.1210; one run each).")
    assert summary["label_verdicts"]["0.3"].startswith("With 30% of the labels, pretraining made no clear difference")
    assert "1.0" not in summary["label_verdicts"]


@pytest.mark.parametrize("metric,at_200,final,verdict", [
    ("val_accuracy", 0.7267, 0.7293, "Pretraining past step 200 made no clear difference downstream (within the noise"),
    ("val_accuracy", 0.62, 0.73, "Pretraining past step 200 still paid: val_accuracy better than from step 200 (+0.11"),
    ("val_accuracy", 0.80, 0.73, "Pretraining past step 200 cost"),
    ("val_loss", 2.5, 2.0, "Pretraining past step 200 still paid: val_loss better than from step 200 (+0.5")])
def test_the_pretraining_steps_curve_says_whether_the_last_stretch_paid(metric, at_200, final, verdict, tmp_path):
    # The check's Debian run: 0.7013 / 0.7267 / 0.7293 at steps 100 / 200 / 1500 had been called "still rising".
    from ptray.config import load_config
    from ptray.sweep import summarize

    mode = "max" if metric == "val_accuracy" else "min"
    cfg = load_config("tiny", [f"run.dir={tmp_path}",  # no metrics there: the final step is pretrain.max_steps
                               "sweep.num_seeds=0", "sweep.label_fractions=[1.0]", "sweep.compare_scratch=false",
                               "sweep.pretrained_steps=[100,200]", "pretrain.max_steps=1500", f"sweep.metric={metric}",
                               f"sweep.mode={mode}"] + (["finetune.task=sft"] if mode == "min" else []))
    sides = {"pretrained": {"winner": {"best_metric": final, "trial_id": "p", "config": {}}}}
    followups = [{"side": "pretrained", "kind": "pretrained_step", "step": step, "value": value, "trial_id": f"s{step}"}
                 for step, value in ((100, 0.7013 if mode == "max" else 3.0), (200, at_200))]
    summary = summarize(cfg, sides, followups, num_val=750)
    assert [p["step"] for p in summary["pretrained_steps"]] == [100, 200, 1500]
    assert summary["steps_verdict"].startswith(verdict), summary["steps_verdict"]


def test_the_verdict_counts_new_seeds_only_never_the_search_trial_that_won():
    # The check's Debian run: each winner's search trial was the best of its side's trials, and counting it as a seed
    # flattered the noisier side (scratch 0.721 in the search, 0.702 over seeds 1-3). ASHA had stopped the pretrained
    # winner at step 235 of 452: a part run, counted for nothing in the verdict either.
    from ptray.config import load_config
    from ptray.sweep import followup_plans, summarize

    cfg = load_config("tiny", ["sweep.num_seeds=3", "sweep.label_fractions=[1.0]", "sweep.pretrained_steps=[]"])
    sides = {"pretrained": {"winner": {"best_metric": 0.7173, "trial_id": "p", "config": {"finetune.lr": 1e-3},
                                       "status": "stopped early"}},
             "scratch": {"winner": {"best_metric": 0.7213, "trial_id": "s", "config": {}, "status": "finished"}}}
    plans, meta = followup_plans(cfg, sides)
    assert [(m["side"], m["seed"]) for m in meta] == [("pretrained", 1), ("pretrained", 2), ("pretrained", 3),
                                                        ("scratch", 1), ("scratch", 2), ("scratch", 3)]
    assert plans[0] == {"finetune.lr": 1e-3, "finetune.init": "pretrained", "run.seed": 1}
    values = [0.731, 0.735, 0.724, 0.691, 0.719, 0.697]  # the check's reruns with seeds 1-3
    followups = [{**m, "value": v, "trial_id": f"f{k}", "config": plan}
                 for k, (m, v, plan) in enumerate(zip(meta, values, plans))]
    summary = summarize(cfg, sides, followups, num_val=750)
    assert summary["sides"]["pretrained"]["seeds"] == [0.731, 0.735, 0.724]
    assert summary["sides"]["scratch"]["seeds"] == [0.691, 0.719, 0.697]  # not the search's 0.7213
    assert summary["pretraining_gain"] == pytest.approx(0.0277, abs=1e-4)  # 0.0190 with the search trials counted
    assert "rerun with 3 new seeds" in summary["verdict"]
    # The side's model is still the best of all its runs: here scratch's search trial (0.7213 > 0.719).
    assert summary["sides"]["scratch"]["best"] == 0.7213 and summary["sides"]["scratch"]["trial_id"] == "s"


def test_a_trial_function_carries_object_refs_not_the_labelled_data():
    # Tune ships the trial function to every trial's actor: the tokenized set must travel by reference only.
    import types

    import numpy as np
    from ray import cloudpickle

    from ptray.trial import make_trial

    sets = types.SimpleNamespace(refs={"v": None}, num_train={"v": 10}, num_val=5, data=np.zeros(1 << 20))  # 8 MiB
    assert len(cloudpickle.dumps(make_trial({}, sets, "/tmp", "val_accuracy", "max"))) < 64 << 10


def test_a_trials_process_imports_no_model_or_training_code():
    """Every Tune trial is a process of its own that unpickles make_trial's function and only drives a TorchTrainer:
    it imports neither transformers, DeepSpeed nor ptray's training code (about 4 s of each trial's start on 2 cores;
    only the Train workers need them). (A fresh interpreter.)"""
    import types

    from ray import cloudpickle

    from ptray.trial import make_trial

    sets = types.SimpleNamespace(refs={"v": None}, num_train={"v": 10}, num_val=5)
    code = """
import sys
from ray import cloudpickle
trial = cloudpickle.loads(sys.stdin.buffer.read())
assert callable(trial)
print([m for m in ("transformers", "deepspeed", "ptray.finetune", "ptray.sweep", "ptray.loop") if m in sys.modules])
"""
    trial = cloudpickle.dumps(make_trial({}, sets, "/tmp", "val_accuracy", "max"))
    out = subprocess.run([sys.executable, "-c", code], input=trial, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["[]"], out.stdout.decode()


def test_label_fraction_runs_keep_the_step_budget():
    from ptray.trial import finetune_schedule
    from ptray.config import load_config
    from ptray.sweep import fraction_plan

    cfg = load_config("tiny", ["finetune.epochs=2"])
    plan = fraction_plan({"finetune.lr": 1e-3}, 0.1, cfg.finetune.epochs)
    assert plan == {"finetune.lr": 1e-3, "finetune.train_fraction": 0.1, "finetune.epochs": 20}
    full = finetune_schedule(cfg, 1800, 750).max_steps
    tenth = finetune_schedule(load_config("tiny", ["finetune.epochs=20"]), 180, 750).max_steps
    assert abs(tenth - full) <= 20  # about the same optimizer steps with a tenth of the examples
    assert fraction_plan({"finetune.epochs": 3}, 0.25, 2)["finetune.epochs"] == 12  # a swept epochs value wins


def test_automatic_eval_interval_bounds_the_cost_of_evaluating():
    from ptray.trial import finetune_schedule

    cfg = load_config("tiny", ["finetune.eval_every=0", "finetune.global_batch_size=16", "finetune.epochs=4"])
    debian = finetune_schedule(cfg, 1800, 750)  # 113 steps an epoch, 750 validation examples
    assert debian.eval_every == 47 and debian.ckpt_every == 47  # 752 training examples between evaluations
    tenth = load_config("tiny", ["finetune.eval_every=0", "finetune.global_batch_size=16", "finetune.epochs=40"])
    assert finetune_schedule(tenth, 180, 750).eval_every == 47  # a tenth of the labels, 40 short epochs: the same
    assert finetune_schedule(cfg, 1800, 20).eval_every == 2  # a small validation set: often
    assert finetune_schedule(cfg, 160, 750).eval_every == 5  # a short run (40 steps): still 8 evaluations
    explicit = load_config("tiny", ["finetune.eval_every=5"])
    assert finetune_schedule(explicit, 1800, 750).eval_every == 5  # a set interval is kept
    assert load_config("tiny").finetune.eval_every == 0  # the built-in configs use the rule


def test_labelled_data_reads_alike_from_jsonl_csv_and_parquet_compressed_or_not(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ptray.config import load_config
    from ptray.finetune import read_labelled_rows

    rows = [{"text": f"example, number {i}: \"quoted\"", "label": ["alpha", "beta"][i % 2]} for i in range(20)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "set.csv")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "set.parquet")
    for name, codec in [("set.jsonl.gz", "gzip"), ("set.csv.zst", "zstd")]:  # compressed, as corpora often are
        with pa.output_stream(str(tmp_path / name), compression=codec) as f:
            f.write((tmp_path / name.rsplit(".", 1)[0]).read_bytes())
    cfg = load_config("tiny", [])
    for name in ("set.jsonl", "set.csv", "set.parquet", "set.jsonl.gz", "set.csv.zst"):
        assert read_labelled_rows([str(tmp_path / name)], cfg) == rows, name


def test_deepspeed_starts_without_mlflow_or_torch_compile():
    """DeepSpeed's autotuner imports mlflow when it can (1.3 s of CPU in every worker process), and every ZeRO-1/2/3
    engine imports DeepSpeed's Muon optimizer, whose @torch.compile decorators pull in TorchDynamo and Inductor (1.4 s
    more). ptray imports DeepSpeed without the one and Muon without compiling, and a ZeRO-2 engine then trains without
    either; mlflow still imports afterwards for ptray's own logger, and torch.compile is DeepSpeed's again. (A fresh
    interpreter: this one has imported all of them.)"""
    code = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from ptray.engine import import_deepspeed
ds = import_deepspeed()
assert "mlflow" not in sys.modules, "mlflow imported"
assert ds.ops.__compatible_ops__
ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as ptray's CPU workers do (engine.load_ops): no op build
from deepspeed.runtime import compiler
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
assert compiler.compile() is torch.compile and isinstance(MuonWithAuxAdam, type)
model = torch.nn.Linear(8, 1)
engine, *_ = ds.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}})
before = model.weight.detach().clone()
engine.backward(engine(torch.ones(2, 8)).sum())
engine.step()
assert not torch.equal(before, model.weight), "no update"
assert "torch._inductor.compile_fx" not in sys.modules and "torch._dynamo.repro.after_dynamo" not in sys.modules
from mlflow.entities import Metric
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code, str(free_port())], capture_output=True, text=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_deepspeed_on_cpu_builds_no_op(tmp_path):
    """DeepSpeed's communication layer JIT-builds a shared-memory all-reduce on CPU that training never uses (only its
    inference all-reduce does): ptray's CPU workers compile nothing (an empty extensions directory here) and still
    train over the process group. (A fresh interpreter, one gloo rank.)"""
    code = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from ptray.config import load_config
from ptray.engine import adopt_process_group
adopt_process_group(load_config("tiny"))
from deepspeed.comm import comm as dist
assert dist.cdb is not None and dist.cdb.shm_comm_op is None
t = torch.ones(3)
dist.all_reduce(t)
assert torch.equal(t, torch.ones(3))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code, str(free_port())], capture_output=True, text=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # nothing built


def test_a_local_session_prestarts_no_workers():
    """Local mode starts Ray without prestarted workers: Ray would start one per logical CPU (5 on 2 cores) as the
    driver connects, each importing Ray and running the setup hook beside the command's own start, though most
    commands use few of them. A task still gets a worker, started for it. (A fresh interpreter with its own Ray.)"""
    code = """
import psutil, ray, time
from ptray.config import load_config
from ptray.session import ray_session
from ray._private import ray_constants
with ray_session(load_config("tiny", ["run.dir=/tmp/unused"])):
    node = ray._private.worker._global_node
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    def workers():  # the raylet's children other than its two agents
        return [p for p in raylet.children() if not p.cmdline()[0].startswith(("ray::DashboardAgent",
                                                                                "ray::RuntimeEnvAgent"))]
    time.sleep(2)
    before = len(workers())
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    print(before, len(workers()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert before == 0 and after >= 1, out.stdout


def test_deepspeed_config_for_each_precision():
    from ptray.config import load_config
    from ptray.engine import deepspeed_config

    config_of = lambda overrides: deepspeed_config(load_config("tiny", overrides),  # noqa: E731
                                                   pretrain_schedule(load_config("tiny", overrides)))
    fp16 = config_of(["deepspeed.precision=fp16", "cluster.use_gpu=true"])
    assert fp16["fp16"]["enabled"] and not fp16["bf16"]["enabled"]
    assert fp16["fp16"]["initial_scale_power"] == 16  # dynamic loss scaling from 2^16
    bf16 = config_of(["deepspeed.precision=bf16", "cluster.use_gpu=true"])
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"] and bf16["data_types"]["grad_accum_dtype"] == "fp32"
    fp32 = config_of([])
    assert not fp32["fp16"]["enabled"] and not fp32["bf16"]["enabled"]


def test_init_from_starts_from_the_given_local_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ptray.config import ModelConfig
    from ptray.model import build_model, init_from_info

    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    model = build_model(ModelConfig(init_from=str(tmp_path)), vocab_size=96, special_ids={})
    saved = GPT2LMHeadModel.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    with pytest.raises(ConfigError, match="model.init_from=.*is not a directory"):
        init_from_info(str(tmp_path / "missing"))


def test_ray_train_and_tune_messages_only_with_verbose(monkeypatch):
    from ptray.cli import main
    from ptray.session import train_logging, verbose

    monkeypatch.setenv("PTRAY_VERBOSE", "0")  # restored after the test, whatever main sets
    assert not verbose() and train_logging().log_level == "WARNING"
    assert main(["pretrain", "--verbose", "--config", "tiny", "pretrain.max_steps=bad"]) == 2  # stops at the config
    assert verbose() and train_logging().log_level == "INFO"


def test_a_finetune_run_is_named_by_its_config_data_and_pretrained_weights(tmp_path):
    from ptray.config import load_config
    from ptray.finetune import LabelledData, run_name

    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    cfg = load_config("tiny", [])
    tensors = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([1])}
    data = LabelledData(train=tensors, val=tensors, id2label={0: "a", 1: "b"})
    name = run_name(cfg, data, str(tmp_path))
    assert run_name(cfg, data, str(tmp_path)) == name  # the same command resumes its run
    assert run_name(load_config("tiny", ["finetune.lr=3e-4"]), data, str(tmp_path)) != name
    edited = {"input_ids": torch.tensor([[5, 6, 8]]), "labels": torch.tensor([1])}
    assert run_name(cfg, LabelledData(train=edited, val=tensors, id2label=data.id2label), str(tmp_path)) != name
    (tmp_path / "model.safetensors").write_bytes(b"weights v2")  # pretrained further
    assert run_name(cfg, data, str(tmp_path)) != name


def test_only_failures_after_training_started_are_retried():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from ptray.errors import StartupError, UserError
    from ptray.session import fit_with_retries

    def failing(*errors):
        attempts = []

        class Trainer:
            def fit(self):
                attempts.append(1)
                raise WorkerGroupError("failed", {rank: UserExceptionWithTraceback(e, "Traceback: ...")
                                                  for rank, e in enumerate(errors)})
        return attempts, Trainer

    # A worker killed mid-run (or any error after the first step): retried max_failures times, then raised.
    attempts, trainer = failing(StartupError("x", "", False), RuntimeError("peer died"))
    with pytest.raises(WorkerGroupError):
        fit_with_retries(trainer, max_failures=2, label="pretrain")
    assert len(attempts) == 3
    # Every worker failed before its first step: one attempt; a user mistake keeps its message, a bug its traceback.
    attempts, trainer = failing(StartupError("model.init_from='m': bad weights", "Traceback: A", True))
    with pytest.raises(UserError, match="model.init_from='m': bad weights"):
        fit_with_retries(trainer, max_failures=3, label="pretrain")
    assert len(attempts) == 1
    attempts, trainer = failing(*[StartupError("ImportError: no op", "Traceback: B", False)] * 2)
    with pytest.raises(RuntimeError, match="before its first optimizer step(.|\n)*Traceback: B"):
        fit_with_retries(trainer, max_failures=-1, label="pretrain")
    assert len(attempts) == 1


@pytest.mark.parametrize("arch_list, built_for", [
    (None, "9.0"), ("", "9.0"),            # nothing set: the GPU present, not every architecture torch knows
    ("9.0a", "9.0"), ("8.0;9.0a;10.0a", "9.0"),  # torch's own names, which DeepSpeed cannot parse (#7589)
    ("8.0 9.0+PTX", None), ("9.0", None),  # a list the user chose that DeepSpeed reads: kept
])
def test_deepspeeds_fused_adam_is_built_for_the_gpu_present(arch_list, built_for):
    from ptray.engine import prepare_fused_adam_build

    assert prepare_fused_adam_build((9, 0), arch_list) == built_for


def test_bf16_on_a_gpu_without_it_names_fp16_and_fp32(monkeypatch):
    from ptray.config import load_config
    from ptray.engine import check_device

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"Tesla T4, compute capability 7.5\) has no bf16 support; use "
                                          r"deepspeed.precision=fp16 \(loss-scaled\) or fp32"):
        check_device(load_config("gpt2-124m"))
    check_device(load_config("gpt2-124m", ["deepspeed.precision=fp16"]))  # fp16 is fine there
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    check_device(load_config("gpt2-124m", ["deepspeed.precision=fp16", "deepspeed.torch_adam=false"]))
    assert os.environ.pop("TORCH_CUDA_ARCH_LIST") == "7.5"  # DeepSpeed's fused Adam: built for this GPU only


WORKER_TORN_DOWN_MID_STEP = """
import sys, threading, time, torch
from ptray.session import exit_at_once_if_torn_down

def train():  # a Train worker's training thread: a daemon, inside torch ops when Ray tears the process down
    if sys.argv[1] == "guarded":
        exit_at_once_if_torn_down()
    x, y = torch.randn(512, 4096, requires_grad=True), torch.randint(0, 4096, (512,))
    while True:
        torch.nn.functional.cross_entropy(x, y).backward()

threading.Thread(target=train, daemon=True).start()
time.sleep(1)
sys.exit(1)  # what Ray's SIGTERM handler does in the main thread when Tune stops a trial early
"""


@pytest.mark.parametrize("guarded", [True, pytest.param(False, marks=pytest.mark.skipif(
    sys.version_info >= (3, 14), reason="Python 3.14 hangs such a thread at shutdown instead of aborting"))])
def test_a_worker_torn_down_mid_step_exits_without_a_fatal_error_stack(guarded):
    import subprocess

    args = [sys.executable, "-X", "faulthandler", "-c", WORKER_TORN_DOWN_MID_STEP, "guarded" if guarded else "bare"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if guarded:
        assert done.returncode == 1 and "Fatal Python error" not in done.stderr, done.stderr[-2000:]
    else:  # the control: without the guard Python's shutdown aborts the process, which is what users saw
        assert done.returncode == -6 and "Fatal Python error: Aborted" in done.stderr


EXIT_IN_A_FINALIZER = """
import sys, weakref
from ptray.worker_setup import quiet_ray_process

if sys.argv[1] == "quiet":
    quiet_ray_process()

class Thing:
    pass

def on_collect(_):  # Ray's SIGTERM handler, arriving while a weakref callback runs
    raise SystemExit(1)

def on_collect_bug(_):
    raise ValueError("a real error in a finalizer")

thing, other = Thing(), Thing()
refs = weakref.ref(thing, on_collect), weakref.ref(other, on_collect_bug)
del thing, other
"""


@pytest.mark.parametrize("quiet", [True, False])
def test_a_stopped_ray_process_prints_no_traceback_from_a_finalizer(quiet):
    """Tune ends a sweep trial's process with SIGTERM; when the handler's SystemExit lands inside a finalizer, Python
    printed "Exception ignored in ..." and a traceback on the user's console. Other errors there still print."""
    import subprocess

    args = [sys.executable, "-c", EXIT_IN_A_FINALIZER, "quiet" if quiet else "bare"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ValueError: a real error in a finalizer" in done.stderr
    assert ("SystemExit" in done.stderr) is not quiet, done.stderr


def test_the_setup_hook_that_every_ray_process_runs_imports_only_the_standard_library():
    """Ray runs ptray's setup hook in each worker process before its first task: Ray Data's tasks and actors in
    `prepare`, sweep trials, Train workers. Living in ptray.session, it imported ray.train there too: 0.8 s of CPU
    for every process (a first task's latency 1.4 s -> 0.6 s without). That the hook runs is test_prepare's
    test_the_local_session_hands_its_settings_to_workers_through_their_environment."""
    code = ("import sys, ptray.worker_setup; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('ray', 'torch', 'transformers', 'pyarrow', 'numpy', 'yaml', 'ptray')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["['ptray',", "'ptray.worker_setup']"], done.stdout + done.stderr


def _tiny_causal_lm(family: str, attention: str, seed: int = 0):
    from ptray.config import ModelConfig
    from ptray.model import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, num_layers=2, hidden_size=64, num_heads=4, max_positions=64, attention=attention)
    return build_model(cfg, vocab_size=128, special_ids={"eos": 0, "pad": None, "mask": None}).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_document_masking_scores_each_packed_document_as_if_alone(family, attention):
    from ptray.objectives import document_positions

    model = _tiny_causal_lm(family, attention)
    documents = [[9, 10, 11, 0], [12, 13, 14, 15, 16, 0], [17, 18, 19]]  # a continued one, a whole one, a cut one
    row = torch.tensor([sum(documents, [])])
    positions = document_positions(row, eos_id=0)
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([d])).logits[0] for d in documents])
        unmasked = model(input_ids=row).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[4:], alone[4:], atol=1e-3)  # without it, later documents see earlier ones


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sdpa_attention_trains_like_eager(family):
    rows = torch.randint(1, 128, (4, 33), generator=torch.Generator().manual_seed(1))

    def losses(attention: str) -> list[float]:
        model = _tiny_causal_lm(family, attention).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        out = []
        for _ in range(5):
            loss = model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    sdpa, eager = losses("sdpa"), losses("eager")
    assert sdpa == pytest.approx(eager, rel=1e-4) and sdpa[-1] < sdpa[0]


def test_flash_attention_without_its_package_names_the_install():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")

    with pytest.raises(ConfigError, match=r"needs the flash-attn package \(pip install flash-attn"):
        _tiny_causal_lm("llama", "flash_attention_2")


# A stand-in for the ops ptray builds (DeepSpeed's fused Adam, on GPUs): a real DeepSpeed OpBuilder that torch
# JIT-builds with the same lock file, build directory and ninja, from one C file that compiles in about a second.
# (DeepSpeed's CPU op, its shared-memory all-reduce, took ~50 s on 2 cores; ptray's CPU runs build nothing.)
TINY_OP = """
import sys
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

class TinyOpBuilder(CPUOpBuilder):
    BUILD_VAR, NAME = "DS_BUILD_PTRAY_TINY_OP", "ptray_tiny_op"

    def __init__(self):
        super().__init__(name=self.NAME)

    def absolute_name(self):
        return self.NAME

    def sources(self):
        return [sys.argv[2]]

    def cxx_args(self):
        return ["-O0"]

if sys.argv[1] == "ptray":
    from ptray.engine import build_op
    build_op(TinyOpBuilder())
else:
    TinyOpBuilder().load()
"""
TINY_OP_SOURCE = """#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "ptray_tiny_op", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_ptray_tiny_op(void) { return PyModule_Create(&module); }
"""


def _load_tiny_op(how: str, tmp_path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    source = tmp_path / "ptray_tiny_op.cpp"
    source.write_text(TINY_OP_SOURCE)
    return subprocess.run([sys.executable, "-c", TINY_OP, how, str(source)], env={**env, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=timeout)


def test_a_lock_file_left_by_a_killed_op_build_does_not_hang_later_runs(tmp_path):
    # A worker killed while torch JIT-built (or checked) a DeepSpeed op left torch's lock file: every later run waited
    # on it forever (CI hung for an hour). This uses the real build directory, as runs do.
    from torch.utils.cpp_extension import _get_build_directory

    left = os.path.join(_get_build_directory("ptray_tiny_op", verbose=False), "lock")
    open(left, "w").close()
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # control: DeepSpeed alone waits on it
            _load_tiny_op("deepspeed", tmp_path, dict(os.environ), timeout=20)
        assert os.path.exists(left)
        loaded = _load_tiny_op("ptray", tmp_path, dict(os.environ), timeout=600)
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert f"removed {left}" in loaded.stdout
        assert not os.path.exists(left)
        assert glob.glob(os.path.join(os.path.dirname(left), "ptray_tiny_op*.so"))  # built
    finally:
        if os.path.exists(left):
            os.remove(left)


def test_ops_build_with_the_ninja_beside_python_whatever_comes_first_on_path(tmp_path):
    """A `ninja` earlier on PATH than this Python's own (a system one, with the virtualenv not activated) is not the one
    that checks or builds the op: alternating ninja versions rebuilt it on every switch."""
    if not os.access(os.path.join(os.path.dirname(sys.executable), "ninja"), os.X_OK):
        pytest.skip("no ninja beside this Python")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/called\nexit 1\n")
    (other / "ninja").chmod(0o755)
    env = {**os.environ, "PATH": f"{other}{os.pathsep}{os.environ['PATH']}"}
    loaded = _load_tiny_op("ptray", tmp_path, env, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert not (tmp_path / "called").exists()


def test_minhash_signatures_estimate_jaccard_similarity_without_bias():
    """Agreement of two MinHash signatures estimates the Jaccard similarity of the documents' word shingles: over 200
    random pairs the error has mean ~0 and the spread theory gives for 128 functions (~0.04); hash functions that are
    not independent (a multiply-add that barely wraps) gave errors of +0.2 and dropped documents 0.6 similar."""
    from ptray.data.minhash import _permutations, lsh_bands, signature

    a, b = _permutations(128)
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(2000)]
    errors = []
    for _ in range(200):
        x = list(rng.choice(vocabulary, 120))
        y = list(x)
        for k in rng.choice(120, int(rng.integers(2, 30)), replace=False):
            y[k] = f"changed{k}"
        sx, sy = ({" ".join(w[i: i + 5]) for i in range(116)} for w in (x, y))
        estimate = np.mean(signature(" ".join(x), 5, a, b) == signature(" ".join(y), 5, a, b))
        errors.append(estimate - len(sx & sy) / len(sx | sy))
    assert abs(np.mean(errors)) < 0.01 and np.std(errors) < 0.06
    bands, rows = lsh_bands(0.65, 128)  # prepare's candidate bands for threshold 0.8
    assert bands * rows <= 128 and 1 - (1 - 0.8 ** rows) ** bands > 0.9  # few pairs at the threshold are missed


class _Trial:  # what a Tune scheduler reads of a trial
    def __init__(self, trial_id: str, status: str = "PENDING"):
        self.trial_id, self.status = trial_id, status


def _run_scheduler(scheduler, reports: dict[str, list[tuple[int, float]]], order: list[str],
                   stopped: dict[str, int] | None = None, position: dict[str, int] | None = None) -> dict[str, int]:
    """Feed the trials' reports to a Tune scheduler in the given interleaving (a list of trial ids, one per report);
    returns {trial: the step at which it was told to stop}. A stopped trial reports no more. `stopped` and `position`
    (reports made so far): a run that goes on from there, finished trials added as such."""
    stopped, position = dict(stopped or {}), dict(position or {t: 0 for t in reports})
    done = {t for t in reports if t in stopped or position[t] == len(reports[t])}
    trials = {t: _Trial(t, "TERMINATED" if t in done else "PENDING") for t in sorted(reports)}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    for trial_id in order:
        if trial_id in stopped or position[trial_id] >= len(reports[trial_id]):
            continue
        step, value = reports[trial_id][position[trial_id]]
        position[trial_id] += 1
        if scheduler.on_trial_result(None, trials[trial_id], {"step": step, "acc": value}) == "STOP":
            stopped[trial_id] = step
        if trial_id in stopped or position[trial_id] == len(reports[trial_id]):
            scheduler.on_trial_complete(None, trials[trial_id], {"step": step, "acc": value})
    return stopped


def _sweep_reports(seed: int, num_trials: int = 8, steps: int = 64, every: int = 8) -> dict[str, list]:
    rng = random.Random(seed)
    reports = {}
    for i in range(num_trials):
        best, rows = 0.0, []
        for step in range(every, steps + 1, every):
            best = max(best, rng.random())
            rows.append((step, round(best, 3)))
        reports[f"abcde_{i:05d}"] = rows
    return reports


@pytest.mark.parametrize("seed", range(5))
def test_ordered_asha_decides_as_tunes_asha_does_with_one_trial_at_a_time_however_trials_interleave(seed):
    """Tune's ASHA stops different trials depending on which concurrent trial reports first (the main job had two
    outcomes). OrderedASHA's decisions are those of Tune's ASHA run one trial at a time, in every interleaving."""
    from ray.tune.schedulers import ASHAScheduler

    from ptray.asha import OrderedASHA

    reports = _sweep_reports(seed)
    serial = [t for t in sorted(reports) for _ in reports[t]]
    tune_asha = ASHAScheduler(time_attr="step", metric="acc", mode="max", max_t=64, grace_period=16,
                              reduction_factor=2)
    expected = {t: step for t, step in _run_scheduler(tune_asha, reports, serial).items() if step < 64}  # not max_t
    assert 0 < len(expected) < len(reports) - 1  # the comparison means something: some stopped, some not
    rng = random.Random(seed)
    for _ in range(20):
        interleaved = serial[:]
        rng.shuffle(interleaved)
        interleaved += serial  # whatever is left, so every trial runs out
        ordered = OrderedASHA(time_attr="step", max_t=64, grace_period=16, reduction_factor=2)
        ordered.set_search_properties("acc", "max")
        told = _run_scheduler(ordered, reports, interleaved)
        assert ordered.decisions() == (expected, set())
        for trial, step in told.items():  # told at its rung, or later when it had to wait for an earlier trial
            assert trial in expected and expected[trial] <= step < 64  # a trial at max_t ends by itself


@pytest.mark.parametrize("seed", range(3))
def test_a_resumed_sweeps_asha_makes_the_decisions_of_an_uninterrupted_one(seed):
    """Tune restores a resumed sweep's scheduler empty; OrderedASHA takes what each trial had reported from the
    trial's log (`logged`), so an interruption anywhere changes no decision."""
    from ptray.asha import OrderedASHA

    reports = _sweep_reports(seed)
    serial = [t for t in sorted(reports) for _ in reports[t]]
    rng = random.Random(seed)
    for _ in range(10):
        interleaved = serial[:]
        rng.shuffle(interleaved)
        interleaved += serial
        first = OrderedASHA(time_attr="step", max_t=64, grace_period=16, reduction_factor=2)
        first.set_search_properties("acc", "max")
        _run_scheduler(first, reports, interleaved)
        expected = first.decisions()
        cut = rng.randrange(1, len(interleaved) // 2)  # the sweep is interrupted after this many scheduled reports
        before = OrderedASHA(time_attr="step", max_t=64, grace_period=16, reduction_factor=2)
        before.set_search_properties("acc", "max")
        told = _run_scheduler(before, reports, interleaved[:cut])
        made = {t: len(before.reports[t]) for t in reports}
        resumed = OrderedASHA(time_attr="step", max_t=64, grace_period=16, reduction_factor=2,
                              logged=lambda trial_id: reports[trial_id][:made[trial_id]])
        resumed.set_search_properties("acc", "max")
        told = _run_scheduler(resumed, reports, interleaved[cut:], stopped=told, position=made)
        assert resumed.decisions() == expected
        for trial, step in told.items():
            assert trial in expected[0] and expected[0][trial] <= step < 64


def test_a_trials_log_replays_what_it_reported_and_its_best_checkpoint_respects_the_stop(tmp_path):
    """The leaderboard replays ASHA's decisions from the trials' logs: each evaluation was a report of the best finite
    value so far (larger better, so `min` metrics are negated). A trial stopped at a step is judged, and exported,
    only by what it had done by then."""
    from ptray.finetune import best_checkpoint
    from ptray.sweep import reported

    log = [{"step": 5, "loss": 2.0}, {"step": 8, "val_accuracy": 0.5}, {"step": 16, "val_accuracy": float("nan")},
           {"step": 24, "val_accuracy": 0.4}, {"step": 32, "val_accuracy": 0.7}]
    assert reported(log, "val_accuracy", "max") == [(8, 0.5), (16, 0.5), (24, 0.5), (32, 0.7)]
    losses = [{"step": 8, "val_loss": 2.0}, {"step": 16, "val_loss": 2.5}, {"step": 24, "val_loss": 1.5}]
    assert reported(losses, "val_loss", "min") == [(8, -2.0), (16, -2.0), (24, -1.5)]
    from ptray import checkpoint as ckpt

    for step, accuracy in ((8, 0.5), (32, 0.7), (40, 0.9)):  # a trial keeps a checkpoint at each new best
        path = tmp_path / f"checkpoint_{step}"
        os.makedirs(path / "ds")
        (path / "metrics.json").write_text(json.dumps({"step": step, "val_accuracy": accuracy}))
        (path / "ds" / "rank_0.pt").write_bytes(b"shard")
        (path / "ds" / "rank_1.pt").write_bytes(b"shard")
        ckpt.write_commit(str(path), ckpt.file_digests(str(path)))
    os.remove(tmp_path / "checkpoint_40" / "ds" / "rank_1.pt")  # killed while rank 1's shard was being written
    assert best_checkpoint(str(tmp_path), "val_accuracy", "max")["metrics"]["step"] == 32
    assert best_checkpoint(str(tmp_path), "val_accuracy", "max", last_step=24)["metrics"]["step"] == 8
