"""Experiment trackers (`run.loggers`): TensorBoard, MLflow and Weights & Biases, behind the one metrics writer.

Every row `metrics.jsonl` gets also goes to each chosen tracker, with the resolved config as the run's parameters:

    tensorboard   event files under <run.dir>/tensorboard/<stage>/   (`tensorboard --logdir <run.dir>/tensorboard`)
    mlflow        to run.mlflow_uri, else $MLFLOW_TRACKING_URI, else <run.dir>/mlruns; one MLflow experiment per
                  run.name; a sweep is one parent run with a child run per trial
    wandb         project run.name, one group per sweep; offline (files under <stage dir>/wandb/) unless
                  WANDB_API_KEY is set or WANDB_MODE says otherwise

Each stage's tracker run ids are kept in `<stage dir>/trackers.json`, so a resumed run keeps logging into the same
MLflow and W&B runs. The libraries' own clients do the work; ptray only maps rows to their calls. They are optional
(`pip install -e ".[trackers]"`) and imported only when chosen.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
import uuid

from ptray.errors import ConfigError

LOGGERS = ("tensorboard", "mlflow", "wandb")  # each also the name of the package it imports


def check_loggers(cfg) -> None:
    """At start-up, before any work: each chosen tracker is installed and an MLflow server answers."""
    for name in cfg.run.loggers:
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(f"run.loggers includes {name!r} but it is not installed; install the "
                              "trackers with pip install -e \".[trackers]\" (or drop it from run.loggers).") from None
    uri = mlflow_uri(cfg)
    if "mlflow" in cfg.run.loggers and uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
                response.read()
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"the MLflow tracking server at {uri} does not answer ({getattr(e, 'reason', e)}); "
                              "start it (mlflow server --host 127.0.0.1 --port 5000), or fix run.mlflow_uri / "
                              "MLFLOW_TRACKING_URI.") from None


def mlflow_uri(cfg) -> str:
    return cfg.run.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        "file://" + os.path.join(os.path.abspath(cfg.run_dir), "mlruns")


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"pretrain.lr": "0.001", ...}: the nested config as the flat string parameters trackers take."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class Trackers:
    """The chosen trackers of one stage (pretraining, one finetune run or trial, or a sweep's summary).

    `stage` names it ("pretrain", "finetune", "sweep", "sweep/<trial>"); `state_dir` keeps its run ids;
    `parent`: the sweep's ids (from `Trackers.ids`) when this is a trial."""

    def __init__(self, cfg, stage: str, state_dir: str, parent: dict | None = None):
        self.stage, self.state_path = stage, os.path.join(state_dir, "trackers.json")
        saved = json.load(open(self.state_path)) if os.path.exists(self.state_path) else {}
        self.ids, self._tb, self._mlflow, self._wandb = {}, None, None, None
        params = flat_params(cfg.to_dict())
        run_name = f"{cfg.run.name}/{stage}"
        if "tensorboard" in cfg.run.loggers:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(os.path.abspath(cfg.run_dir), "tensorboard", stage))
            if not saved:
                self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        if "mlflow" in cfg.run.loggers:
            from mlflow import MlflowClient
            from mlflow.entities import Param

            uri = mlflow_uri(cfg)
            if uri.startswith("file:"):  # a directory (the default): MLflow 3 refuses its file store unless allowed
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._mlflow = MlflowClient(uri)
            run_id = saved.get("mlflow_run_id")
            if not run_id:
                experiment = self._mlflow.get_experiment_by_name(cfg.run.name)
                experiment_id = experiment.experiment_id if experiment else \
                    self._mlflow.create_experiment(cfg.run.name)
                tags = {"mlflow.parentRunId": parent["mlflow_run_id"]} if parent and "mlflow_run_id" in parent \
                    else {}
                run_id = self._mlflow.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
                items = list(params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                    self._mlflow.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i: i + 100]])
            self.ids["mlflow_run_id"] = run_id
        if "wandb" in cfg.run.loggers:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.ids["wandb_id"] = saved.get("wandb_id") or uuid.uuid4().hex[:8]
            group = (parent or {}).get("wandb_group") or (self.ids["wandb_id"] if stage == "sweep" else None)
            if stage == "sweep":
                self.ids["wandb_group"] = group
            self._wandb = wandb.init(project=cfg.run.name, name=run_name, id=self.ids["wandb_id"], resume="allow",
                                     group=group, dir=state_dir, config=params, mode=mode,
                                     # flushed every second: a trial ASHA stops is killed, with no time to finish
                                     settings=wandb.Settings(console="off", silent=True,
                                                             x_transaction_log_flush_interval=1.0))
        if self.ids and self.ids != saved:
            os.makedirs(state_dir, exist_ok=True)
            with open(self.state_path + ".tmp", "w") as f:
                json.dump(self.ids, f)
            os.replace(self.state_path + ".tmp", self.state_path)

    def describe(self) -> str:
        """Where this stage's metrics go, for its start-up line."""
        where = []
        if self._tb:
            where.append(f"tensorboard {self._tb.log_dir}")
        if self._mlflow:
            where.append(f"mlflow run {self.ids['mlflow_run_id']} at {self._mlflow.tracking_uri}")
        if self._wandb:
            where.append(f"wandb run {self.ids['wandb_id']} ({self._wandb.settings.mode}, {self._wandb.dir})")
        return "; ".join(where)

    def log(self, row: dict) -> None:
        """A metrics row's finite numbers, at its step."""
        step = int(row.get("step", 0))
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}
        if not values:
            return
        if self._tb:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._mlflow:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow.log_batch(self.ids["mlflow_run_id"],
                                   metrics=[Metric(k, v, now, step) for k, v in values.items()])
        if self._wandb:
            self._wandb.log(values, step=step)

    def log_files(self, paths: list[str]) -> None:
        """Files (the report and its plots) as the run's artifacts; PNGs also as images."""
        if self._mlflow:
            for path in paths:
                self._mlflow.log_artifact(self.ids["mlflow_run_id"], path)
        images = [p for p in paths if p.endswith(".png")]
        if self._tb and images:
            import matplotlib.image

            for path in images:
                self._tb.add_image(os.path.basename(path), matplotlib.image.imread(path)[..., :3], dataformats="HWC")
        if self._wandb:
            import wandb

            self._wandb.log({f"report/{os.path.basename(p)}": wandb.Image(p) for p in images})
            for path in paths:
                self._wandb.save(path, base_path=os.path.dirname(path), policy="now")

    def end_killed_children(self, trial_dirs: list[str]) -> None:
        """A sweep's trials that ASHA stopped were killed before they could end their MLflow runs: those still shown
        as running are ended as KILLED (what they logged stays), so no run of a finished sweep looks alive."""
        if not self._mlflow:
            return
        for trial_dir in trial_dirs:
            path = os.path.join(trial_dir, "trackers.json")
            run_id = json.load(open(path)).get("mlflow_run_id") if os.path.exists(path) else None
            if run_id and self._mlflow.get_run(run_id).info.status == "RUNNING":
                self._mlflow.set_terminated(run_id, status="KILLED")

    def close(self, finished: bool = True) -> None:
        if self._tb:
            self._tb.close()
        if self._mlflow:
            with contextlib.redirect_stdout(io.StringIO()):  # its "View run at" lines: `describe` said where
                self._mlflow.set_terminated(self.ids["mlflow_run_id"], status="FINISHED" if finished else "FAILED")
        if self._wandb:
            self._wandb.finish(exit_code=0 if finished else 1)


def log_report(cfg, run_dir: str) -> None:
    """After `ptray report`: the report and its plots go to the sweep's tracker run (else pretraining's)."""
    if not cfg.run.loggers:
        return
    files = [os.path.join(run_dir, "report.md")] + sorted(glob.glob(os.path.join(run_dir, "report", "*.png")))
    sweep_dir = os.path.join(run_dir, "sweep")
    stage, state_dir = ("sweep", sweep_dir) if os.path.exists(os.path.join(sweep_dir, "trackers.json")) \
        else ("pretrain", run_dir)
    trackers = Trackers(cfg, stage, state_dir)
    trackers.log_files([f for f in files if os.path.exists(f)])
    trackers.close()
