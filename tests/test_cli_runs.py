"""The `ptray` command in-process, on one real local Ray for the module: commands with a relative run directory, and
user mistakes, each of which exits 2 with a message naming the key or file, prints no traceback, and leaves what an
earlier run wrote (prepared shards, checkpoints, export, config.yaml) exactly as it was. (The command as a separate
process with its own Ray: test_resume.py, test_cluster.py and test_config.py.)"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from transformers import AutoModelForCausalLM

from ptray.cli import main
from ptray.pretrain import pretrain


def test_pretrain_then_finetune_commands_with_relative_run_dir(ray_local, tmp_path, monkeypatch, capfd):
    # As in the README: the default run.dir (runs/tiny) is relative to where the user runs ptray; Ray's workers
    # run elsewhere, so every path must reach them absolute.
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "tiny", "data.builtin_docs=2000", "pretrain.max_steps=10",
                 "pretrain.log_every=5", "pretrain.eval_every=10", "pretrain.ckpt_every=10"]) == 0
    output = "".join(capfd.readouterr())
    assert "step      5/10 | loss" in output and output.count("step     10/10 | loss") == 1  # one line, not echoed
    assert "Started training worker group" not in output  # Ray Train's own messages need --verbose
    assert "Reporting training result" not in output and "PreemptionWatcher" not in output
    assert f"export {tmp_path}/runs/tiny/export" in output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "runs/tiny/export").config.n_layer == 2
    assert main(["finetune", "--config", "tiny", "data.builtin_docs=2000", "finetune.builtin_examples=200",
                 "finetune.epochs=1"]) == 0
    assert (tmp_path / "runs/tiny/finetune-classification/export/model.safetensors").exists()


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """A finished tiny pretraining run (shards, checkpoints, export) and a folder of broken input files."""
    run_dir = tmp_path_factory.mktemp("run")
    pretrain(tiny_config(run_dir, "data.builtin_docs=2000", "pretrain.max_steps=4", "pretrain.ckpt_every=4",
                         "pretrain.eval_every=4", "pretrain.log_every=2"))
    (run_dir / "sweep").mkdir()
    (run_dir / "sweep" / "leaderboard.csv").write_text("an earlier sweep's results: a bad sweep must keep them\n")
    files = tmp_path_factory.mktemp("files")
    for name, content in {
        "empty.txt": b"\n\n",
        "latin1.txt": "caf\xe9 ol\xe9 and some more words\n".encode("latin-1"),
        "image.txt": b"GIF89a\0\0\x80\xff",
        "torn.jsonl": b'{"text": "a fine first record"}\n{"text": "cut off\n',
        "nested.jsonl": b'{"text": {"body": "nested text"}}\n',
        "broken.parquet": b"PAR1 this is not parquet",
        "nolabel.jsonl": b'{"text": "a labelled example without its label"}\n' * 40,
        "empty.jsonl": b"",
        "notes.txt": b"a file, not a directory\n",
    }.items():
        (files / name).write_bytes(content)
    pq.write_table(pa.table({"text": [1, 2, 3]}), files / "numbers.parquet")
    return str(run_dir), str(files)


def _snapshot(root: str) -> dict:
    """Every file under root with its size and modification time: a rewrite or a new file changes it."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return found


# (command and arguments, what the message must name). RUN and FILES stand for the fixture's run and input folders.
BAD_INPUTS = [
    # configuration keys and values, checked before Ray is touched
    (["pretrain", "pretrain.max_step=10"], "'pretrain.max_step'"),
    (["pretrain", "pretrian.max_steps=10"], "'pretrian'"),
    (["pretrain", "pretrain.lr=-1e-3"], "pretrain.lr"),
    (["pretrain", "pretrain.lr=0"], "pretrain.lr"),
    (["pretrain", "pretrain.max_steps=ten"], "pretrain.max_steps must be an integer"),
    (["pretrain", "pretrain.global_batch_size=0"], "pretrain.global_batch_size"),
    (["pretrain", "pretrain.micro_batch_size=7"], "pretrain.micro_batch_size"),
    (["pretrain", "run.seed=-1"], "run.seed"),
    (["pretrain", "model.family=gpt3"], "model.family='gpt3'"),
    (["pretrain", "deepspeed.precision=fp8"], "deepspeed.precision"),
    (["pretrain", "deepspeed.zero_stage=4"], "deepspeed.zero_stage=4"),
    (["pretrain", "data.seq_len=1000"], "data.seq_len=1000"),
    (["pretrain", "data.val_fraction=2"], "data.val_fraction"),
    (["pretrain", "model.attention=flash"], "model.attention='flash'"),
    (["pretrain", "model.attention=flash_attention_2"], "model.attention=flash_attention_2 runs on GPUs only"),
    (["pretrain", "model.family=bert", "pretrain.objective=mlm", "data.document_masking=true"],
     "data.document_masking=true needs causal pretraining"),
    (["pretrain", "cluster.use_gpu=maybe"], "cluster.use_gpu"),
    (["pretrain", "--address", "127.0.0.1:99999"], "99999"),
    (["pretrain", "run.dir=FILES/notes.txt"], "notes.txt"),
    (["finetune", "finetune.max_len=500"], "finetune.max_len=500"),
    (["finetune", "finetune.train_fraction=1.5"], "finetune.train_fraction"),
    (["finetune", "finetune.pooling=cls"], "finetune.pooling=cls"),
    (["finetune", "finetune.task=regression"], "finetune.task"),
    (["sweep", "sweep.num_samples=0"], "sweep.num_samples"),
    (["sweep", "sweep.space={model.hidden_size: {choice: [64, 128]}}"], "model.hidden_size"),
    (["sweep", "sweep.space={finetune.lr: {loguniform: [1e-2, 1e-4]}}"], "finetune.lr"),
    (["sweep", "sweep.label_fractions=[0]"], "sweep.label_fractions"),
    (["sweep", "sweep.grace_period=1000", "sweep.pretrained_steps=[]"], "sweep.grace_period=1000"),
    (["sweep", "sweep.pretrained_steps=[3]"], "sweep.pretrained_steps"),
    (["sweep", "finetune.task=sft", "sweep.metric=val_loss", "sweep.mode=min"],  # tiny's space has lm_weight 0.5
     "sweep.space gives finetune.lm_weight=0.5"),
    # corpus files
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/missing/*.txt]"], "missing/*.txt"),
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/empty.txt]"], "no documents left after cleaning"),
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/latin1.txt]"], "latin1.txt line 1 is not UTF-8"),
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/image.txt]"], "image.txt line 1 holds NUL bytes"),
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/torn.jsonl]"], "torn.jsonl line 2 is not JSON"),
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/nested.jsonl]"], "nested.jsonl line 1"),
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/broken.parquet]"], "broken.parquet"),
    (["prepare", "run.dir=FILES/prep", "data.train_files=[FILES/numbers.parquet]"], "column 'text' holds int64"),
    # the same files streamed (data.ingest=ray_data): checked on the driver before any worker starts
    (["pretrain", "run.dir=FILES/st", "data.ingest=ray_data", "data.train_files=[FILES/empty.txt]"],
     "empty.txt holds no documents"),
    (["pretrain", "run.dir=FILES/st", "data.ingest=ray_data", "data.train_files=[FILES/latin1.txt]"],
     "latin1.txt line 1 is not UTF-8"),
    (["pretrain", "run.dir=FILES/st", "data.ingest=ray_data", "data.train_files=[FILES/broken.parquet]"],
     "broken.parquet"),
    (["pretrain", "data.ingest=streaming"], "data.ingest='streaming'"),
    # labelled files
    (["finetune", "finetune.train_files=[FILES/missing.jsonl]"], "missing.jsonl"),
    (["finetune", "finetune.train_files=[FILES/nolabel.jsonl]"], "label"),
    (["finetune", "finetune.train_files=[FILES/empty.jsonl]"], "empty.jsonl"),
    (["finetune", "finetune.pretrained=FILES/no-such-export"], "no-such-export"),
    # a rerun of the finished run with what its checkpoints cannot continue
    (["pretrain", "model.hidden_size=128"], "model"),
    (["pretrain", "deepspeed.zero_stage=3"], "zero_stage"),
    (["pretrain", "data.vocab_size=2048"], "data.vocab_size 1024 -> 2048"),
    (["pretrain", "data.train_files=[FILES/notes.txt]"], "data.train_files ['builtin'] -> "),
    (["report", "FILES/no-such-run"], "no-such-run"),
]


@pytest.mark.parametrize("args, names", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_a_bad_input_exits_2_naming_it_and_changes_nothing(run, capsys, args, names):
    run_dir, files = run
    args = [a.replace("RUN", run_dir).replace("FILES", files) for a in args]
    command, rest = args[0], args[1:]
    argv = [command, *rest] if command == "report" else [command, "--config", "tiny", f"run.dir={run_dir}",
                                                           "data.builtin_docs=2000", *rest]
    before = _snapshot(run_dir)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert names in err and "Traceback" not in err, err[-2000:]
    assert _snapshot(run_dir) == before  # nothing the earlier run wrote was touched, nothing half-written was left


def test_pipeline_stops_on_a_bad_space_value_before_pretraining(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "pipe"
    code = main(["pipeline", "--config", "tiny", f"run.dir={run_dir}", "data.builtin_docs=2000",
                 "sweep.space={finetune.layer_decay: {uniform: [0.6, 1.2]}}"])
    err = capsys.readouterr().err
    assert code == 2 and "sweep.space gives finetune.layer_decay=1.2" in err, err[-2000:]
    assert not (run_dir / "data").exists() and not (run_dir / "train").exists()  # nothing prepared or pretrained


def test_the_table_holds_at_least_30_inputs():
    assert len(BAD_INPUTS) >= 30


def _train_run_attempts() -> int:
    """Worker-group attempts of every Ray Train run in this Ray, from Train's own state tracking."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    return 0 if actor is None else sum(len(a) for a in ray.get(actor.get_train_run_attempts.remote()).values())


def test_an_error_before_the_first_optimizer_step_is_not_retried(run, tmp_path, capsys, monkeypatch):
    """A worker whose model build raises (the weights in model.init_from cut in half) would raise the same on every
    retry: with cluster.max_failures=3 the run makes one attempt and stops with the error, exit 2."""
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    run_dir, _ = run
    broken = tmp_path / "broken-model"
    AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "export")).save_pretrained(broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _train_run_attempts()
    code = main(["pretrain", "--config", "tiny", f"run.dir={tmp_path / 'run'}", f"data.prepared_dir={run_dir}/data",
                 f"model.init_from={broken}", "cluster.max_failures=3", "pretrain.max_steps=4"])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    # Ray Train logs the worker's exception as it happened; ptray's own message closes the output.
    assert err.strip().splitlines()[-1].startswith("ptray pretrain: error: model.init_from="), err[-3000:]
    assert "could not be loaded" in err and "restarting the workers" not in err, err[-3000:]
    assert _train_run_attempts() - before == 1
