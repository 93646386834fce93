"""Exact resume: a run killed mid-way and started again continues with the very next global batch and ends with the
same per-step losses and the same weights as a run that was never interrupted (CPU, fp32, fixed seed).

Every run here is a `ptray` subprocess with its own local Ray, so a kill takes the whole process tree down, as losing
the driver's machine would.
"""

import contextlib
import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from ptray.metrics import read_metrics

STEPS = ["pretrain.max_steps=16", "pretrain.log_every=1", "pretrain.ckpt_every=6", "pretrain.eval_every=100",
         "pretrain.eval_batches=2", "pretrain.warmup_steps=4"]


def _ptray_args(run_dir, prepared_dir):
    return [sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", f"run.dir={run_dir}",
            f"data.prepared_dir={prepared_dir}", *STEPS]


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    proc = subprocess.run([sys.executable, "-m", "ptray.cli", "prepare", "--config", "tiny",
                           f"run.dir={out.parent}", "data.builtin_docs=4000"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(prepared_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(_ptray_args(run_dir, prepared_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _train_rows(run_dir):
    return {r["step"]: r for r in read_metrics(str(run_dir)) if "loss" in r}


def _assert_matches(run_dir, uninterrupted, resumed_at):
    """Every step after the resume trained on the same tokens with the same loss, and the final weights agree."""
    expected, resumed = _train_rows(uninterrupted), _train_rows(run_dir)
    assert sorted(resumed) == list(range(1, 17))  # rows past the checkpoint were replaced, not duplicated
    for step in range(resumed_at + 1, 17):
        assert resumed[step]["data_fingerprint"] == expected[step]["data_fingerprint"], step
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 1e-6, step
    final, reference = load_file(run_dir / "export/model.safetensors"), load_file(uninterrupted / "export/model.safetensors")
    for name, tensor in reference.items():
        assert (final[name] - tensor).abs().max().item() <= 1e-6, name


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

    rerun = subprocess.run(_ptray_args(tmp_path, prepared_dir), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", rerun.stdout + rerun.stderr).group(1))
    assert resumed_at in (6, 12) and resumed_at < killed_at

    _assert_matches(tmp_path, uninterrupted, resumed_at)


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return sorted(p for p in glob.glob(str(dst / "train" / "checkpoint_*")) if os.path.isdir(p))  # steps 12, 16


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(prepared_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    previous, latest = _copy_run(uninterrupted, run_dir)
    shard = max(glob.glob(f"{latest}/ds/**/*.pt", recursive=True), key=os.path.getsize)
    with open(shard, "r+b") as f:  # a torn write: the file is cut short
        f.truncate(os.path.getsize(shard) // 2)
    rerun = subprocess.run(_ptray_args(run_dir, prepared_dir), capture_output=True, text=True, timeout=600)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert f"skipping checkpoint {latest}: ds/{os.path.relpath(shard, latest + '/ds')} has" in output
    assert f"resumed from {previous} at step 12" in output
    expected, resumed = _train_rows(uninterrupted), _train_rows(run_dir)
    for step in range(13, 17):
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 1e-6, step


def test_resume_on_another_world_size_continues_the_loss(prepared_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    previous, latest = _copy_run(uninterrupted, run_dir)
    os.remove(f"{latest}/commit.json")  # as if the run had died while saving step 16: resume from step 12
    rerun = subprocess.run(_ptray_args(run_dir, prepared_dir) + ["cluster.num_workers=1"], capture_output=True,
                           text=True, timeout=600)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert f"resumed from {previous} at step 12; world size 2 -> 1" in output
    expected, resumed = _train_rows(uninterrupted), _train_rows(run_dir)
    for step in range(13, 17):
        # Same tokens per global batch on any world size; the loss differs only by the restarted Adam moments.
        assert resumed[step]["data_fingerprint"] == expected[step]["data_fingerprint"], step
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 0.05 * expected[step]["loss"], step


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


def test_a_killed_worker_is_restarted_from_the_checkpoint_and_matches(prepared_dir, uninterrupted, tmp_path):
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(_ptray_args(tmp_path, prepared_dir) + ["cluster.max_failures=1"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any(step >= 8 for step in _train_rows(tmp_path)):
            assert driver.poll() is None and time.time() < deadline, "the run ended before a worker could be killed"
            time.sleep(0.05)
        workers = [pid for pid, args in _descendants(driver.pid) if args.startswith("ray::RayTrainWorker")]
        assert len(workers) == 2, _descendants(driver.pid)
        os.kill(workers[1], signal.SIGKILL)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", output).group(1))
    _assert_matches(tmp_path, uninterrupted, resumed_at)
