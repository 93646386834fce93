"""Experiment trackers (`run.loggers`) against the real things: a real `mlflow server` on 127.0.0.1 read back through
the MLflow client, TensorBoard event files read back with TensorBoard's reader, and W&B's offline run files. One
`ptray pipeline` (pretraining, a sweep with follow-up runs, the report) logs to all three."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version

import pytest

from conftest import free_port
from ptray.cli import main
from ptray.metrics import read_metrics


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1. ptray installs only MLflow's client (`mlflow-skinny`: the full
    package pins a pyarrow older than Ray Data needs); the server's own code, which only the full package ships, is
    added for this process alone (its dependencies come with the `test` extra)."""
    root = tmp_path_factory.mktemp("mlflow")
    env = dict(os.environ)
    try:
        import mlflow.server  # noqa: F401  (the full package is installed here)
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root / "server"),
                        f"mlflow=={version('mlflow-skinny')}"], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(root / "server"), env.get("PYTHONPATH", "")])
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                               "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                              env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(1)
    yield uri
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def pipeline_run(ray_local, mlflow_server, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    assert main(["pipeline", "--config", "tiny", f"run.dir={run_dir}", "data.builtin_docs=2000",
                 "pretrain.max_steps=10", "pretrain.log_every=2", "pretrain.eval_every=5", "pretrain.ckpt_every=10",
                 "finetune.builtin_examples=300", "finetune.epochs=1", "finetune.eval_every=4",
                 "sweep.num_samples=2", "sweep.compare_scratch=false", "sweep.label_fractions=[1.0]",
                 "sweep.pretrained_steps=[]", "sweep.num_seeds=1",
                 "run.loggers=[tensorboard,mlflow,wandb]", f"run.mlflow_uri={mlflow_server}"]) == 0
    return str(run_dir)


def _trial_dirs(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "sweep", "trials", "*", "metrics.jsonl")))


def _ids(directory: str) -> dict:
    return json.load(open(os.path.join(directory, "trackers.json")))


def test_tensorboard_gets_every_logged_metric(pipeline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(pipeline_run, "tensorboard", "pretrain"))
    events.Reload()
    rows = [r for r in read_metrics(pipeline_run) if "loss" in r]
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [5, 10]
    for metrics in _trial_dirs(pipeline_run):  # every trial under the same root, one directory each
        trial = os.path.basename(os.path.dirname(metrics))
        trial_events = EventAccumulator(os.path.join(pipeline_run, "tensorboard", "sweep", trial))
        trial_events.Reload()
        evals = [r for r in read_metrics(os.path.dirname(metrics)) if "val_accuracy" in r]
        assert [e.value for e in trial_events.Scalars("val_accuracy")] == pytest.approx(
            [r["val_accuracy"] for r in evals])
    report = EventAccumulator(os.path.join(pipeline_run, "tensorboard", "sweep"), size_guidance={"images": 0})
    report.Reload()
    assert "pretrain_loss.png" in report.Tags()["images"]  # the report's plots


def test_mlflow_server_gets_metrics_params_a_parent_run_per_sweep_and_the_report(pipeline_run, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    pretrain_run = client.get_run(_ids(pipeline_run)["mlflow_run_id"])
    assert pretrain_run.info.status == "FINISHED" and pretrain_run.info.run_name == "tiny/pretrain"
    assert pretrain_run.data.params["pretrain.max_steps"] == "10"  # the resolved config as parameters
    assert pretrain_run.data.params["run.loggers"] == '["tensorboard", "mlflow", "wandb"]'
    rows = [r for r in read_metrics(pipeline_run) if "loss" in r]
    history = client.get_metric_history(pretrain_run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]

    sweep_dir = os.path.join(pipeline_run, "sweep")
    parent = client.get_run(_ids(sweep_dir)["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = _trial_dirs(pipeline_run)
    assert len(trials) == 3 and len(children) == len(trials)  # 2 search trials and the winner's rerun
    stopped = {r["trial_id"] for r in csv.DictReader(open(os.path.join(sweep_dir, "leaderboard.csv")))
               if r["status"] == "stopped early"}
    for metrics in trials:
        child = client.get_run(_ids(os.path.dirname(metrics))["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        # A trial that ran to its end closed its tracker runs (Tune did not kill it at its last report); one that ASHA
        # stopped was killed, and the sweep ended its run as such; none looks alive. (A stopped trial may also reach
        # its last step in the moment before Tune's stop arrives: a 16-step trial stopped at step 4 did so in CI.)
        stopped_early = os.path.basename(os.path.dirname(metrics)) in stopped
        assert child.info.status in (("KILLED", "FINISHED") if stopped_early else ("FINISHED",)), \
            (stopped_early, child.info.status)
        evals = [r for r in read_metrics(os.path.dirname(metrics)) if "val_accuracy" in r]
        accuracy = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.value for m in accuracy] == pytest.approx([r["val_accuracy"] for r in evals])
    best = json.load(open(os.path.join(pipeline_run, "best.json")))
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["value"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.json", "leaderboard.csv", "report.md", "pretrain_loss.png", "sweep_trials.png"} <= artifacts


def test_wandb_writes_offline_runs_without_a_key(pipeline_run):
    assert "WANDB_API_KEY" not in os.environ
    for directory in [pipeline_run, os.path.join(pipeline_run, "sweep")] + \
            [os.path.dirname(m) for m in _trial_dirs(pipeline_run)]:
        run_id = _ids(directory)["wandb_id"]
        files = glob.glob(os.path.join(directory, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
        assert files and all(os.path.getsize(f) > 1000 for f in files), directory  # (a resumed run: one more)


def test_the_sweeps_end_marks_the_mlflow_runs_of_killed_trials(tmp_path):
    """A trial that ASHA stops is killed with its MLflow run still RUNNING: the sweep's parent ends it as KILLED and
    leaves the runs that ended alone. (MLflow's file store; the pipeline above may or may not stop a trial.)"""
    from mlflow import MlflowClient

    from ptray.config import load_config
    from ptray.trackers import Trackers

    cfg = load_config("tiny", [f"run.dir={tmp_path}", "run.loggers=[mlflow]"])
    parent = Trackers(cfg, "sweep", str(tmp_path / "sweep"))
    trials = {name: tmp_path / "sweep" / "trials" / name for name in ("killed", "finished")}
    for name, trial_dir in trials.items():
        trial_dir.mkdir(parents=True)
        trial = Trackers(cfg, f"sweep/{name}", str(trial_dir), parent=parent.ids)
        if name == "finished":
            trial.close()
    parent.end_killed_children([str(d) for d in trials.values()] + [str(tmp_path / "sweep" / "no-trackers")])
    parent.close()
    client = MlflowClient(f"file://{tmp_path}/mlruns")
    status = {name: client.get_run(_ids(str(d))["mlflow_run_id"]).info.status for name, d in trials.items()}
    assert status == {"killed": "KILLED", "finished": "FINISHED"}


def test_an_unknown_logger_or_an_mlflow_server_that_does_not_answer_stops_before_any_work(tmp_path, capsys):
    assert main(["pretrain", "--config", "tiny", f"run.dir={tmp_path}", "run.loggers=[tensorboard,neptune]"]) == 2
    assert "run.loggers has 'neptune'" in capsys.readouterr().err
    started = time.time()
    assert main(["pretrain", "--config", "tiny", f"run.dir={tmp_path}", "run.loggers=[mlflow]",
                 f"run.mlflow_uri=http://127.0.0.1:{free_port()}"]) == 2
    error = capsys.readouterr().err
    assert "does not answer" in error and "run.mlflow_uri" in error and "Traceback" not in error
    assert time.time() - started < 30 and os.listdir(tmp_path) == []  # nothing prepared, nothing trained
