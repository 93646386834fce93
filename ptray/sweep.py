"""`ptray sweep`: Ray Tune over finetuning hyperparameters; each trial is itself a multi-worker Ray Train run.

    ptray sweep --config tiny                                    # 6 trials x 2 workers, ASHA, on runs/tiny/export
    ptray sweep --config tiny sweep.searcher=optuna sweep.num_samples=12
    ptray sweep --config tiny --resume                           # continue an interrupted sweep

Outputs in `<run.dir>/sweep/`: `leaderboard.csv` (one row per trial), `trials/<trial>/` (each trial's Train run and
metrics.jsonl); and in `<run.dir>/`: `best.json` and `best/` (the best trial's own best checkpoint, exported).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time

import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from ptray.config import Config, load_config_dict, save_config, with_absolute_paths
from ptray.errors import ConfigError, UserError
from ptray.finetune import (METRICS, best_checkpoint, build_trainer, export_finetuned, prepare_finetune)
from ptray.metrics import read_metrics
from ptray.session import worker_scaling


def search_space(cfg: Config) -> dict:
    """Tune's param_space from `sweep.space` (keys stay dotted config keys)."""
    space = {}
    for key, spec in cfg.sweep.space.items():
        kind, values = next(iter(spec.items()))
        if kind in ("loguniform", "uniform"):
            values = [float(v) for v in values]  # YAML 1.1 reads `1e-4` as a string
        if kind == "loguniform":
            space[key] = tune.loguniform(*values)
        elif kind == "uniform":
            space[key] = tune.uniform(*values)
        elif kind == "randint":
            space[key] = tune.randint(values[0], values[1] + 1)  # inclusive upper bound, as written
        elif kind == "choice":
            space[key] = tune.choice(values)
        else:
            if cfg.sweep.searcher == "optuna":
                space[key] = tune.choice(values)  # Optuna samples; a grid is only enumerated by the grid searcher
            else:
                space[key] = tune.grid_search(values)
    return space


def max_concurrent_trials(cfg: Config) -> int:
    """Trials that fit the cluster at once: its CPUs (or GPUs) over one trial's workers."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    resources = ray.cluster_resources()
    if cfg.cluster.use_gpu:
        fit = resources.get("GPU", 0) // cfg.cluster.num_workers
    else:
        fit = resources.get("CPU", 0) // (cfg.cluster.num_workers * cfg.cluster.cpus_per_worker)
    return max(1, int(fit))  # sweep() has already checked with worker_scaling that one trial fits


def trial_config(base: dict, overrides: dict) -> Config:
    """The base config (as a dict) with a trial's sampled dotted overrides applied and validated."""
    return load_config_dict(base, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def make_trial(base: dict, data_ref, trials_dir: str, metric: str, mode: str, num_examples: int):
    def trial(overrides: dict) -> None:
        cfg = trial_config(base, overrides)
        name = tune.get_context().get_trial_id()
        trainer = build_trainer(cfg, data_ref, storage_path=trials_dir, name=name, num_examples=num_examples,
                                callbacks=[TuneReportCallback()], metric=metric, mode=mode)
        trainer.fit()
    return trial


class SweepInterrupted(UserError):
    """Tune stopped before every trial ended; its state is saved for `--resume`."""


@dataclasses.dataclass
class SweepResult:
    leaderboard: str
    best_dir: str
    best: dict


def sweep(cfg: Config, resume: bool = False) -> SweepResult:
    """Run (or resume) the sweep, write the leaderboard, and export the best trial's best checkpoint."""
    cfg = with_absolute_paths(cfg)
    s = cfg.sweep
    if s.metric not in METRICS[cfg.finetune.task]:
        raise ConfigError(f"sweep.metric={s.metric!r} is not reported by finetune.task={cfg.finetune.task!r}; "
                          f"choose one of {', '.join(METRICS[cfg.finetune.task])}.")
    worker_scaling(cfg)  # fail fast if one trial's workers can never be placed
    run_dir = os.path.abspath(cfg.run_dir)
    sweep_dir = os.path.join(run_dir, "sweep")
    trials_dir = os.path.join(sweep_dir, "trials")
    os.makedirs(trials_dir, exist_ok=True)
    save_config(cfg, sweep_dir)
    data_ref, data = prepare_finetune(cfg)  # read and tokenized once; every trial reads it from the object store
    num_examples = len(data.train["labels"])
    trial = make_trial(cfg.to_dict(), data_ref, trials_dir, s.metric, s.mode, num_examples)
    # The trial function only drives a TorchTrainer: a sliver of CPU, so it never blocks its own workers.
    trainable = tune.with_resources(trial, {"cpu": 0.01})
    started = time.time()
    if resume and tune.Tuner.can_restore(os.path.join(sweep_dir, "tune")):
        tuner = tune.Tuner.restore(os.path.join(sweep_dir, "tune"), trainable=trainable,
                                   restart_errored=False, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                                        search_alg=searcher(cfg, max_concurrent_trials(cfg)),
                                        scheduler=scheduler(cfg, num_examples)),
            run_config=tune.RunConfig(name="tune", storage_path=sweep_dir))
    results = tuner.fit()
    # After Ctrl-C / SIGTERM Tune returns normally, having saved the unfinished trials as PENDING for a resume.
    unfinished = [t.trial_id for t in ExperimentAnalysis(results.experiment_path).trials
                  if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SweepInterrupted(f"the sweep was interrupted with {len(unfinished)} trial(s) unfinished "
                               f"({', '.join(unfinished)}); continue it with `ptray sweep --resume` and the same "
                               "config.")
    rows = leaderboard_rows(results, s.metric, s.mode, trials_dir)
    write_leaderboard(rows, os.path.join(sweep_dir, "leaderboard.csv"))
    candidates = [r for r in rows if r["status"] in ("finished", "stopped early") and not r["diverged"]
                  and r["best_metric"] is not None]
    if not candidates:
        raise ConfigError(f"no trial reported a finite {s.metric!r}; see {sweep_dir}/leaderboard.csv and the trial logs.")
    winner = (max if s.mode == "max" else min)(candidates, key=lambda r: r["best_metric"])
    best = best_checkpoint(os.path.join(trials_dir, winner["trial_id"]), s.metric, s.mode)
    best_dir = os.path.join(run_dir, "best")
    export_finetuned(trial_config(cfg.to_dict(), winner["config"]), best["path"], data, best_dir)
    summary = {"trial_id": winner["trial_id"], "metric": s.metric, "mode": s.mode,
               "value": best["metrics"][s.metric], "step": best["metrics"]["step"], "config": winner["config"],
               "checkpoint": best["path"], "export": best_dir, "num_trials": len(rows),
               "wall_time_s": round(time.time() - started, 1)}
    if s.compare_scratch:
        summary["scratch"] = train_scratch(cfg, winner["config"], data_ref, num_examples, sweep_dir)
        summary["pretraining_gain"] = summary["value"] - summary["scratch"]["value"]
    with open(os.path.join(run_dir, "best.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[sweep] {len(rows)} trials; best {s.metric} {summary['value']:.4f} ({winner['trial_id']}, "
          f"{winner['config']}). Leaderboard {sweep_dir}/leaderboard.csv, best model {best_dir}, "
          f"summary {run_dir}/best.json", flush=True)
    return SweepResult(leaderboard=os.path.join(sweep_dir, "leaderboard.csv"), best_dir=best_dir, best=summary)


def searcher(cfg: Config, max_concurrent: int):
    """Optuna TPE, or Tune's variant generator for random and grid search; both capped at `max_concurrent`."""
    if cfg.sweep.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=cfg.run.seed, max_concurrent=max_concurrent)


def scheduler(cfg: Config, num_examples: int):
    if cfg.sweep.scheduler == "none":
        return FIFOScheduler()
    steps = cfg.finetune.epochs * max(1, num_examples // cfg.finetune.global_batch_size)
    num_evals = max(1, steps // cfg.finetune.eval_every)  # one Tune iteration per evaluation
    return ASHAScheduler(time_attr="training_iteration", max_t=num_evals, grace_period=cfg.sweep.grace_period,
                         reduction_factor=cfg.sweep.reduction_factor)


def leaderboard_rows(results, metric: str, mode: str, trials_dir: str) -> list[dict]:
    rows = []
    num_evals = max((len(r.metrics_dataframe) for r in results if r.metrics_dataframe is not None), default=0)
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path).split("_")[-1]
        history = read_metrics(os.path.join(trials_dir, trial_id))
        values = [r[metric] for r in history if metric in r]
        finite = [v for v in values if math.isfinite(v)]
        losses = [r["loss"] for r in history if "loss" in r]
        diverged = any(not math.isfinite(v) for v in values + losses) or any("stopped" in r for r in history)
        evals = len(values)
        # Tune's count of a trial's results, not the trial's own log: a trial ASHA stops may still log the evaluation
        # it was running.
        reported = len(result.metrics_dataframe) if result.metrics_dataframe is not None else 0
        if result.error:
            status = "error"
        elif reported < num_evals:
            status = "stopped early"
        else:
            status = "finished"
        rows.append({
            "trial_id": trial_id, "config": result.config, "status": status, "diverged": diverged,
            "final_metric": values[-1] if values else None,
            "best_metric": ((max if mode == "max" else min)(finite) if finite else None),
            "evaluations": evals, "steps": max((r["step"] for r in history), default=0),
            "wall_time_s": round(result.metrics.get("time_total_s", 0.0), 1) if result.metrics else None,
        })
    return sorted(rows, key=lambda r: (r["best_metric"] is None, -(r["best_metric"] or 0) if mode == "max"
                                       else (r["best_metric"] or 0)))


def write_leaderboard(rows: list[dict], path: str) -> None:
    keys = sorted({k for r in rows for k in r["config"]})
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial_id", *keys, "status", "diverged", "final_metric", "best_metric",
                         "evaluations", "steps", "wall_time_s"])
        for i, r in enumerate(rows, 1):
            writer.writerow([i, r["trial_id"], *[r["config"].get(k) for k in keys], r["status"], r["diverged"],
                             r["final_metric"], r["best_metric"], r["evaluations"], r["steps"], r["wall_time_s"]])
    os.replace(path + ".tmp", path)


def train_scratch(cfg: Config, best_config: dict, data_ref, num_examples: int, sweep_dir: str) -> dict:
    """The winning configuration again from random initialization: the leaderboard's 'no pretraining' row."""
    overrides = {**best_config, "finetune.init": "scratch"}
    scratch_cfg = trial_config(cfg.to_dict(), overrides)
    trainer = build_trainer(scratch_cfg, data_ref, storage_path=sweep_dir, name="scratch", num_examples=num_examples,
                            metric=cfg.sweep.metric, mode=cfg.sweep.mode)
    trainer.fit()
    best = best_checkpoint(os.path.join(sweep_dir, "scratch"), cfg.sweep.metric, cfg.sweep.mode)
    return {"value": best["metrics"][cfg.sweep.metric], "step": best["metrics"]["step"], "config": overrides}
