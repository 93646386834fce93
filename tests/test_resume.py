"""Exact resume: a run killed mid-way and started again continues with the very next global batch and ends with the
same per-step losses and the same weights as a run that was never interrupted (CPU, fp32, fixed seed).

A run that is killed is a `ptray` subprocess with its own local Ray, so a kill takes the whole process tree down, as
losing the driver's machine would. The runs nothing kills are the `ptray` command in-process, on one local Ray for the
module (a separate process and Ray costs each ~15 s of start-up on 2 cores).
"""

import contextlib
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ptray.cli import main
from ptray.config import load_config
from ptray.data.manifest import read_manifest
from ptray.loop import fingerprint
from ptray.metrics import read_metrics
from ptray.pretrain import training_stream

STEPS = ["pretrain.max_steps=16", "pretrain.log_every=1", "pretrain.ckpt_every=6", "pretrain.eval_every=100",
         "pretrain.eval_batches=2", "pretrain.warmup_steps=4", "pretrain.num_to_keep=3"]


def _ptray_args(run_dir, prepared_dir):
    return [sys.executable, "-m", "ptray.cli", *_pretrain_argv(run_dir, prepared_dir)]


def _pretrain_argv(run_dir, prepared_dir):
    return ["pretrain", "--config", "tiny", f"run.dir={run_dir}", f"data.prepared_dir={prepared_dir}", *STEPS]


def _pretrain(capfd, run_dir, prepared_dir, *overrides) -> str:
    """`ptray pretrain` in-process on the module's Ray, which must succeed; returns its console output."""
    capfd.readouterr()
    code = main(_pretrain_argv(run_dir, prepared_dir) + list(overrides))
    output = "".join(capfd.readouterr())
    assert code == 0, output[-3000:]
    return output


# What Ray and the libraries print on their own; without --verbose none of it reaches the console.
LIBRARY_CHATTER = ("Token authentication is enabled", "Progress bars disabled", "Reporting training result",
                   "PreemptionWatcher", "Started training worker group", "LOAD REPORT", "built successfully",
                   "is deprecated", "Processing zero checkpoint", "Loading weights", "Writing model shards", "it/s]")


def _run_quietly(args) -> str:
    """A ptray command in its own process and local Ray, as a user starts it (RAY_AUTH_MODE unset), which must succeed
    with only ptray's own lines on the console. Returns the console output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert not [line for line in LIBRARY_CHATTER if line in console], console[-3000:]
    return console


@pytest.fixture(scope="module")
def prepared_dir(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    assert main(["prepare", "--config", "tiny", f"run.dir={out.parent}", "data.builtin_docs=4000"]) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted(prepared_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert main(_pretrain_argv(run_dir, prepared_dir)) == 0
    return run_dir


def _train_rows(run_dir):
    return {r["step"]: r for r in read_metrics(str(run_dir)) if "loss" in r}


def _assert_matches(run_dir, uninterrupted, output, prepared_dir) -> int:
    """The rerun resumed where its checkpoint says, every step after it trained on the same tokens with the same loss,
    and the final weights agree. Returns the step it resumed at."""
    checkpoint, resumed_at = re.search(r"resumed from (\S+) at step (\d+)", output).groups()
    resumed_at = int(resumed_at)
    expected, resumed = _train_rows(uninterrupted), _train_rows(run_dir)
    assert sorted(resumed) == list(range(1, 17))  # rows past the checkpoint were replaced, not duplicated
    # The data position, checked directly: the token ids at the position the checkpoint records are those both runs
    # trained on in the step after it.
    first_batch = _fingerprint_at(prepared_dir, json.load(open(f"{checkpoint}/trainer_state.json"))["rows_consumed"])
    assert resumed[resumed_at + 1]["data_fingerprint"] == expected[resumed_at + 1]["data_fingerprint"] == first_batch
    for step in range(resumed_at + 1, 17):
        assert resumed[step]["data_fingerprint"] == expected[step]["data_fingerprint"], step
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 1e-6, step
    final, reference = (load_file(run_dir / "export/model.safetensors"),
                        load_file(uninterrupted / "export/model.safetensors"))
    for name, tensor in reference.items():
        assert (final[name] - tensor).abs().max().item() <= 1e-6, name
    return resumed_at


def _fingerprint_at(prepared_dir, position: int) -> int:
    """The data_fingerprint of the global batch at stream `position`, read straight from the prepared shards: each
    worker's micro-batches fingerprinted on their input ids, as the training loop does."""
    p = load_config("tiny").pretrain
    manifest = read_manifest(str(prepared_dir))
    stream, reader = training_stream(load_config("tiny"), manifest, str(prepared_dir))
    rows = reader.gather(*stream.rows(position, p.global_batch_size))
    micro_batches = np.split(rows, p.global_batch_size // p.micro_batch_size)
    return sum(fingerprint(torch.from_numpy(micro_batch).long()[:, :-1]) for micro_batch in micro_batches)


def test_driver_killed_mid_run_then_rerun_matches_the_uninterrupted_run(prepared_dir, uninterrupted, tmp_path):
    driver = subprocess.Popen(_ptray_args(tmp_path, prepared_dir), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not any(step >= 8 for step in _train_rows(tmp_path)):  # past the step-6 checkpoint
        assert driver.poll() is None and time.time() < deadline, "the first run ended before it could be killed"
        time.sleep(0.05)
    # The driver and its whole local Ray (raylet, GCS, workers: not all in its process group), as if its machine died.
    for pid in [driver.pid] + [pid for pid, _ in _descendants(driver.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.wait()
    time.sleep(1)
    killed_at = max(_train_rows(tmp_path))
    assert killed_at < 16

    output = _run_quietly(_ptray_args(tmp_path, prepared_dir))  # the rerun, as a user starts it after the crash
    resumed_at = _assert_matches(tmp_path, uninterrupted, output, prepared_dir)
    assert resumed_at in (6, 12) and resumed_at < killed_at


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return _checkpoints(dst)  # steps 6, 12, 16


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(prepared_dir, uninterrupted, tmp_path, capfd):
    run_dir = tmp_path / "run"
    *_, previous, latest = _copy_run(uninterrupted, run_dir)
    shard = max(glob.glob(f"{latest}/ds/**/*.pt", recursive=True), key=os.path.getsize)
    with open(shard, "r+b") as f:  # a torn write: the file is cut short
        f.truncate(os.path.getsize(shard) // 2)
    output = _pretrain(capfd, run_dir, prepared_dir)
    assert f"skipping checkpoint {latest}: ds/{os.path.relpath(shard, latest + '/ds')} has" in output
    assert f"resumed from {previous} at step 12" in output
    expected, resumed = _train_rows(uninterrupted), _train_rows(run_dir)
    for step in range(13, 17):
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 1e-6, step


def test_resume_on_another_world_size_continues_the_loss(prepared_dir, uninterrupted, tmp_path, capfd):
    run_dir = tmp_path / "run"
    *_, previous, latest = _copy_run(uninterrupted, run_dir)
    os.remove(f"{latest}/commit.json")  # as if the run had died while saving step 16: resume from step 12
    output = _pretrain(capfd, run_dir, prepared_dir, "cluster.num_workers=1")
    assert f"resumed from {previous} at step 12; world size 2 -> 1" in output
    expected, resumed = _train_rows(uninterrupted), _train_rows(run_dir)
    for step in range(13, 17):
        # Same tokens per global batch on any world size, and all state carried over (through a DeepSpeed universal
        # checkpoint): the losses differ only by summation order.
        assert resumed[step]["data_fingerprint"] == expected[step]["data_fingerprint"], step
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 1e-4 * expected[step]["loss"], step


# Stage 1 shares stage 2's path (partitioned optimizer state through a universal checkpoint), tested above.
@pytest.mark.parametrize("zero_stage,workers,new_workers", [(0, 2, 1), (3, 2, 1)])
def test_every_zero_stage_resumes_on_another_world_size(prepared_dir, tmp_path, capfd, zero_stage, workers,
                                                        new_workers):
    """ZeRO-2 2 -> 1 is tested above against the 16-step run; here each other stage gets its own 8-step run."""
    args = [f"deepspeed.zero_stage={zero_stage}", "pretrain.max_steps=8", "pretrain.ckpt_every=4"]
    _pretrain(capfd, tmp_path, prepared_dir, *args, f"cluster.num_workers={workers}")
    expected = _train_rows(tmp_path)
    at_4, at_8 = _checkpoints(tmp_path)
    os.remove(f"{at_8}/commit.json")  # as if the run had died while saving step 8: resume from step 4
    output = _pretrain(capfd, tmp_path, prepared_dir, *args, f"cluster.num_workers={new_workers}")
    restored = {0: "all state restored", 1: "all state restored through a DeepSpeed universal checkpoint",
                3: "weights restored, Adam moments restarted"}[zero_stage]
    assert f"resumed from {at_4} at step 4; world size {workers} -> {new_workers}: {restored}" in output
    resumed = _train_rows(tmp_path)
    for step in range(5, 9):
        assert resumed[step]["data_fingerprint"] == expected[step]["data_fingerprint"], step
    deviation = {step: abs(resumed[step]["loss"] - expected[step]["loss"]) / expected[step]["loss"]
                 for step in (5, 6, 7, 8)}
    # Step 5's loss is computed with the restored weights on the same global batch: equal up to summation order.
    assert deviation[5] <= 1e-5, deviation
    if zero_stage < 3:  # all state carries over: the same run, up to summation order
        assert max(deviation.values()) <= 1e-4, deviation
    else:
        # Restarted Adam moments make the first update a full-size first Adam step (lr per coordinate) rather than a
        # damped one (ZeRO-1 restarting them was 6.3% off the uninterrupted run at step 6, 1.4% at step 8, with
        # moments of only 4 steps behind them). Asserted: within 10%, and converging back.
        assert max(deviation.values()) <= 0.10 and deviation[8] < deviation[6], deviation


def test_non_finite_losses_skip_updates_then_stop_keeping_the_last_good_checkpoint(prepared_dir, uninterrupted,
                                                                                  tmp_path, capfd):
    # The fault is injected through the workers' environment: the first run needs its own Ray.
    faulty = {**os.environ, "PTRAY_INJECT_NONFINITE_STEPS": "3,8-10"}  # rank 0's loss is NaN at these steps
    first = subprocess.run(_ptray_args(tmp_path, prepared_dir), env=faulty, capture_output=True, text=True, timeout=600)
    assert first.returncode == 2, first.stderr[-3000:]
    kept = _checkpoints(tmp_path)
    assert len(kept) == 1  # step 6; none is written while the loss is not finite
    assert ("ptray pretrain: error: pretrain: the loss was not finite in 3 optimizer steps in a row (steps 8-10; "
            "pretrain.max_nonfinite_steps=3)") in first.stderr
    assert f"the last good checkpoint, {kept[0]} (step 6), is kept" in first.stderr
    ours = [line for line in first.stderr.splitlines() if " pid=" not in line]  # not Ray actors' own log lines
    assert not any("Traceback" in line for line in ours) and not (tmp_path / "export").exists()
    rows, expected = _train_rows(tmp_path), _train_rows(uninterrupted)
    assert sorted(rows) == list(range(1, 11))
    assert [rows[s]["skipped_steps"] for s in (2, 3, 7, 10)] == [0, 1, 1, 4] and math.isnan(rows[3]["loss"])
    for step in range(1, 11):  # a skipped step's batch is consumed, not retried: the data order is unchanged
        assert rows[step]["data_fingerprint"] == expected[step]["data_fingerprint"], step
    assert abs(rows[2]["loss"] - expected[2]["loss"]) <= 1e-6  # identical up to the first skip
    assert abs(rows[4]["loss"] - expected[4]["loss"]) > 1e-6  # then step 3's update is missing

    assert f"resumed from {kept[0]} at step 6" in _pretrain(capfd, tmp_path, prepared_dir)
    rows = _train_rows(tmp_path)
    assert sorted(rows) == list(range(1, 17)) and rows[16]["skipped_steps"] == 1
    assert all(math.isfinite(rows[s]["loss"]) for s in range(7, 17))


def _checkpoints(run_dir):
    return sorted(p for p in glob.glob(str(run_dir / "train" / "checkpoint_*")) if os.path.isdir(p))


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `pid`."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        child, parent, *args = line.split(None, 2)
        children.setdefault(int(parent), []).append((int(child), args[0] if args else ""))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def test_a_killed_worker_is_restarted_from_the_checkpoint_and_matches(prepared_dir, uninterrupted, tmp_path, capfd):
    """In-process: the command runs here while a thread kills one of its workers (both are below this process, under
    the module's raylet) once step 8 is logged, past the step-6 checkpoint."""
    killed = []

    def kill_a_worker():
        deadline = time.time() + 300
        while not any(step >= 8 for step in _train_rows(tmp_path)) and time.time() < deadline:
            time.sleep(0.05)
        workers = [pid for pid, args in _descendants(os.getpid()) if args.startswith("ray::RayTrainWorker")]
        if len(workers) == 2:
            os.kill(workers[1], signal.SIGKILL)
        killed.append(workers)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    output = _pretrain(capfd, tmp_path, prepared_dir, "cluster.max_failures=1")
    killer.join(timeout=60)
    assert len(killed) == 1 and len(killed[0]) == 2, killed  # one of the two was killed mid-run
    _assert_matches(tmp_path, uninterrupted, output, prepared_dir)
