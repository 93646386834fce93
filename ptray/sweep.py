"""`ptray sweep`: Ray Tune over finetuning hyperparameters; each trial is itself a multi-worker Ray Train run.

    ptray sweep --config tiny                                    # search from the pretrained export, and from scratch
    ptray sweep --config tiny sweep.searcher=optuna sweep.num_samples=12
    ptray sweep --config tiny --resume                           # continue an interrupted sweep
    ptray sweep --config tiny --resume sweep.label_fractions=[0.1,1.0]   # keep the search, redo the follow-ups

What it runs, each stage a Tune experiment of Train runs (concurrent as far as the cluster allows):
1. `search`: `sweep.num_samples` trials over `sweep.space` from the pretrained model (ASHA stops poor ones early);
2. with `sweep.compare_scratch`, `search-scratch`: the same space and budget from random initialization (best against
   best: a fair verdict on pretraining);
3. `followup`: each side's winning configuration again with `sweep.num_seeds` new seeds (the verdict compares their
   means), and at each of `sweep.label_fractions` of the labelled training set (does pretraining cut the labels
   needed?).

Outputs in `<run.dir>/sweep/`: `leaderboard.csv` (one row per search trial), `trials/<trial>/` (each trial's Train
run and metrics.jsonl); and in `<run.dir>/`: `best.json` and `best/` (the best run's own best checkpoint, exported:
of each side's search winner and its reruns with other seeds, the best, on the better of the two sides).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import statistics
import time

import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from ptray.asha import OrderedASHA, rungs, stop_steps
from ptray.config import (DATA_KEYS, Config, check_space_values, load_config, save_config, snapshot_steps,
                          space_values, trial_config, with_absolute_paths)
from ptray.errors import ConfigError, UserError
from ptray.finetune import METRICS, best_checkpoint, check_pretrained, export_finetuned, load_labelled
from ptray.data.tokenizer import load_tokenizer
from ptray.loop import snapshot_dir
from ptray.metrics import read_metrics
from ptray.session import verbose, worker_scaling
from ptray.trackers import Trackers
from ptray.trial import data_key, finetune_schedule, make_trial, pretrained_dir

SIDES = ("pretrained", "scratch")
TRIAL_CPUS = 0.01  # a Tune trial's own share: it only drives a TorchTrainer (0 is rejected)


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
    else:  # each trial also holds TRIAL_CPUS for its driver: without it the last trial's workers never fit
        fit = resources.get("CPU", 0) // (cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + TRIAL_CPUS)
    return max(1, int(fit))  # sweep() has already checked with worker_scaling that one trial fits


# ---- labelled data per data variant ----------------------------------------------------------------------------


class LabelledSets:
    """The labelled data tokenized once per distinct data variant (max_len, train_fraction), in the object store;
    every trial of that variant reads it from there."""

    def __init__(self, cfg: Config):
        self.tokenizer = load_tokenizer(pretrained_dir(cfg))
        self.refs: dict[str, ray.ObjectRef] = {}
        self.num_train: dict[str, int] = {}
        self.num_val = 0  # the same in every variant
        self.data = None  # the base variant's data: labels and val set for export and re-evaluation

    def add(self, cfg: Config) -> str:
        key = data_key(cfg)
        if key not in self.refs:
            data = load_labelled(cfg, self.tokenizer)
            self.refs[key], self.num_train[key] = ray.put(data), len(data.train["labels"])
            self.num_val = len(data.val["labels"])
            self.data = self.data or data
        return key

    def add_space(self, cfg: Config) -> None:
        """Every data variant a search over `sweep.space` can sample (data keys are choice/grid: a finite set)."""
        space = cfg.sweep.space
        values = [[(key, v) for v in space_values(space[key])] for key in DATA_KEYS if key in space]
        for combination in itertools.product(*values):
            self.add(trial_config(cfg.to_dict(), dict(combination)))


# ---- scheduler: rungs in optimizer steps, relative to each trial's own length ----------------------------------


def longest_trial(cfg: Config, sets: LabelledSets) -> tuple[int, int]:
    """(steps of the longest trial the space can produce, warm-up steps of the longest warm-up)."""
    space = cfg.sweep.space
    length_keys = [k for k in ("finetune.epochs", "finetune.train_fraction", "finetune.global_batch_size",
                               "finetune.micro_batch_size", "finetune.warmup_ratio") if k in space]
    longest, warmup = 0, 0
    for combination in itertools.product(*[[(k, v) for v in space_values(space[k])] for k in length_keys]):
        trial = trial_config(cfg.to_dict(), dict(combination))
        num_train = sets.num_train.get(data_key(trial)) or max(sets.num_train.values())
        schedule = finetune_schedule(trial, num_train, sets.num_val)
        longest = max(longest, schedule.max_steps)
        warmup = max(warmup, schedule.warmup_steps)
    return longest, warmup


def grace_steps(cfg: Config, longest: int, warmup: int) -> int:
    """ASHA's first rung in optimizer steps: `sweep.grace_period` (0: a quarter of the longest trial), never before the
    longest warm-up ends. A grace period longer than the run is a mistake: it would stop nothing."""
    grace = cfg.sweep.grace_period or math.ceil(0.25 * longest)
    if cfg.sweep.grace_period >= longest:
        raise ConfigError(f"sweep.grace_period={cfg.sweep.grace_period} optimizer steps is not shorter than the "
                          f"longest trial ({longest} steps), so ASHA could never stop a trial; lower it (0: a "
                          "quarter of the run) or use sweep.scheduler=none.")
    return max(grace, warmup, 1)


def scheduler(cfg: Config, longest: int, grace: int, trials_dir: str):
    if cfg.sweep.scheduler == "none":
        return FIFOScheduler()
    # time_attr "step": rungs are measured in optimizer steps, whatever a trial's length or eval interval. ASHA's
    # decisions in trial order, not in the order concurrent trials happen to report (see ptray.asha).
    return OrderedASHA(time_attr="step", max_t=longest, grace_period=grace, reduction_factor=cfg.sweep.reduction_factor,
                       logged=functools.partial(logged_reports, trials_dir, cfg.sweep.metric, cfg.sweep.mode))


def logged_reports(trials_dir: str, metric: str, mode: str, trial_id: str) -> list[tuple[int, float]]:
    """What a trial reported before a sweep was interrupted, from its log (see `reported`); [] for a new trial."""
    return reported(read_metrics(os.path.join(trials_dir, trial_id)), metric, mode)


def searcher(cfg: Config, max_concurrent: int):
    """Optuna TPE, or Tune's variant generator for random and grid search; both capped at `max_concurrent`, and both
    starting from the configuration's own values (see `configured_point`)."""
    start = [point] if (point := configured_point(cfg)) else None
    if cfg.sweep.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed, points_to_evaluate=start),
                                  max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=cfg.run.seed, max_concurrent=max_concurrent, points_to_evaluate=start)


def configured_point(cfg: Config) -> dict | None:
    """The config's own values of the swept keys, when they lie inside the space: the first trial, so a sweep never
    ends below the untuned run just because no sample landed near it (4 random samples over lr x freezing missed the
    configured lr 1e-4 with full finetuning, the best region, on real text). None for grid spaces, which enumerate."""
    point = {}
    for key, spec in cfg.sweep.space.items():
        kind, values = next(iter(spec.items()))
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if kind == "grid":
            return None
        inside = value in values if kind == "choice" else float(values[0]) <= value <= float(values[1])
        if not inside:
            return None
        point[key] = value
    return point


# ---- running Tune experiments ------------------------------------------------------------------------------------


def run_tune(cfg: Config, trainable, *, sweep_dir: str, name: str, param_space: dict, num_samples: int, search_alg,
             sched, resume: bool):
    """One Tune experiment in `<sweep_dir>/<name>`; resumed when asked and a saved state exists."""
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_CPUS})  # the trial only drives a TorchTrainer
    path = os.path.join(sweep_dir, name)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, restart_errored=False, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            # ASHA and Optuna rank trials by their best evaluation so far (`best_<metric>`, reported by the loop),
            # the figure selection uses: one unlucky evaluation at a rung does not stop a trial that did better.
            tune_config=tune.TuneConfig(metric=f"best_{cfg.sweep.metric}", mode=cfg.sweep.mode,
                                        num_samples=num_samples, search_alg=search_alg, scheduler=sched),
            run_config=tune.RunConfig(name=name, storage_path=sweep_dir, verbose=1 if verbose() else 0))
    results = tuner.fit()
    # After Ctrl-C / SIGTERM Tune returns normally, having saved the unfinished trials as PENDING for a resume.
    unfinished = [t.trial_id for t in ExperimentAnalysis(results.experiment_path).trials
                  if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SweepInterrupted(f"the sweep was interrupted with {len(unfinished)} trial(s) unfinished "
                               f"({', '.join(unfinished)}); continue it with `ptray sweep --resume` and the same "
                               "config.")
    return results


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
    worker_scaling(cfg, driver_cpus=TRIAL_CPUS)  # fail fast if one trial (its workers and itself) can never fit
    check_pretrained(cfg, pretrained_dir(cfg))
    check_space_values(cfg, lambda trial: check_pretrained(trial, pretrained_dir(cfg)))  # before any trial
    for step in snapshot_steps(cfg):
        snapshot_export(cfg, step)  # before any trial runs
    sets = LabelledSets(cfg)  # tokenized once per data variant; every trial reads its variant from the object store
    sets.add(cfg)
    sets.add_space(cfg)
    longest, warmup = longest_trial(cfg, sets)
    grace = grace_steps(cfg, longest, warmup) if s.scheduler == "asha" else 0
    milestones = rungs(grace, longest, s.reduction_factor) if s.scheduler == "asha" else []
    # Only now, with the data and the schedule checked, may a new sweep replace the previous one's results.
    run_dir = os.path.abspath(cfg.run_dir)
    sweep_dir = os.path.join(run_dir, "sweep")
    start_or_resume(cfg, sweep_dir, resume)
    trackers = Trackers(cfg, "sweep", sweep_dir) if cfg.run.loggers else None  # the trials' parent run
    parent = trackers.ids if trackers else None
    if trackers:
        print(f"[sweep] tracking: {trackers.describe()} (each trial a child run)", flush=True)
    trials_dir = os.path.join(sweep_dir, "trials")
    os.makedirs(trials_dir, exist_ok=True)
    if s.scheduler == "asha":
        print(f"[sweep] ASHA: rungs at {grace} optimizer steps x {s.reduction_factor}^k, up to {longest} steps "
              f"(the longest trial; warm-up ends by step {warmup})", flush=True)
    started = time.time()
    concurrent = max_concurrent_trials(cfg)
    base = cfg.to_dict()

    sides = {}
    for side in SIDES if s.compare_scratch else SIDES[:1]:
        side_base = trial_config(base, {"finetune.init": side}).to_dict()
        name = "search" if side == "pretrained" else "search-scratch"
        results = run_tune(cfg, make_trial(side_base, sets, trials_dir, s.metric, s.mode, tracker_parent=parent),
                           sweep_dir=sweep_dir,
                           name=name, param_space=search_space(cfg), num_samples=s.num_samples,
                           search_alg=searcher(cfg, concurrent), sched=scheduler(cfg, longest, grace, trials_dir),
                           resume=resume)
        rows = leaderboard_rows(results, cfg, sets, trials_dir, side, milestones)
        candidates = [r for r in rows if r["status"] in ("finished", "stopped early") and not r["diverged"]
                      and r["best_metric"] is not None]
        if not candidates:
            raise ConfigError(f"no {side} trial reported a finite {s.metric!r}; see the trial logs in {trials_dir}.")
        winner = (max if s.mode == "max" else min)(candidates, key=lambda r: r["best_metric"])
        sides[side] = {"rows": rows, "winner": winner, "base": side_base}
    write_leaderboard(ranked([r for side in sides.values() for r in side["rows"]], s.mode),
                      os.path.join(sweep_dir, "leaderboard.csv"))

    followups = run_followups(cfg, sides, sets, sweep_dir, trials_dir, concurrent, resume, parent)
    summary = summarize(cfg, sides, followups, num_val=len(sets.data.val["labels"]))
    if sets.data.cut_note:  # for the report: a cut that large can matter more than any hyperparameter
        summary["cut_note"] = sets.data.cut_note
    winner_side = summary["side"]
    winner = summary["sides"][winner_side]
    stop_step = {r["trial_id"]: r["stop_step"] for side in sides.values() for r in side["rows"]}
    best = best_checkpoint(os.path.join(trials_dir, winner["trial_id"]), s.metric, s.mode,
                           last_step=stop_step.get(winner["trial_id"]))
    best_dir = os.path.join(run_dir, "best")
    export_finetuned(trial_config(sides[winner_side]["base"], winner["config"]), best["path"], sets.data, best_dir)
    summary.update({"trial_id": winner["trial_id"], "metric": s.metric, "mode": s.mode,
                    "value": best["metrics"][s.metric], "step": best["metrics"]["step"], "config": winner["config"],
                    "checkpoint": best["path"], "export": best_dir,
                    "num_trials": sum(len(side["rows"]) for side in sides.values()),
                    "wall_time_s": round(time.time() - started, 1)})
    with open(os.path.join(run_dir, "best.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(run_dir, "best.json.tmp"), os.path.join(run_dir, "best.json"))
    if trackers:
        trackers.log({"step": 0, f"best_{s.metric}": summary["value"], "num_trials": summary["num_trials"],
                      **{f"{side}_{s.metric}": found["seed_mean"] for side, found in summary["sides"].items()},
                      **({"pretraining_gain": summary["pretraining_gain"]} if "pretraining_gain" in summary else {})})
        trackers.log_files([os.path.join(run_dir, "best.json"), os.path.join(sweep_dir, "leaderboard.csv")])
        trackers.end_killed_children([os.path.join(trials_dir, t) for t in sorted(os.listdir(trials_dir))])
        trackers.close()
    verdicts = " ".join([summary["verdict"], *summary.get("label_verdicts", {}).values()])
    print(f"[sweep] best {s.metric} {summary['value']:.4f} ({winner_side}, {winner['trial_id']}, {winner['config']}). "
          f"{verdicts} Leaderboard {sweep_dir}/leaderboard.csv, best model {best_dir}, summary {run_dir}/best.json",
          flush=True)
    return SweepResult(leaderboard=os.path.join(sweep_dir, "leaderboard.csv"), best_dir=best_dir, best=summary)


def start_or_resume(cfg: Config, sweep_dir: str, resume: bool) -> None:
    """A new sweep replaces the previous one's results; `--resume` continues it only if the search's configuration is
    unchanged (a changed configuration must never silently return an older run's results). Changed follow-up keys
    alone (`sweep.num_seeds`, `label_fractions`, `pretrained_steps`) keep the finished search and rerun the follow-ups:
    the curve with fewer labels can be asked for after a long search."""
    saved = os.path.join(sweep_dir, "config.yaml")
    if resume and os.path.exists(saved):
        before = load_config(saved)
        if results_key(before, followups=False) != results_key(cfg, followups=False):
            raise ConfigError(f"the configuration differs from the one the sweep in {sweep_dir} started with, so "
                              "--resume would mix results of two configurations; run without --resume to start a new "
                              f"sweep (it replaces {sweep_dir}), or resume with the saved config: --config {saved}. "
                              f"(Only {', '.join('sweep.' + k for k in FOLLOWUP_KEYS)} may change on --resume.)")
        if results_key(before) != results_key(cfg):
            print("[sweep] resuming with changed follow-ups: the search's trials are kept, the follow-up runs start "
                  "again", flush=True)
            discard_followups(sweep_dir)
    elif os.path.isdir(sweep_dir):
        print(f"[sweep] starting a new sweep: the previous results in {sweep_dir} are replaced", flush=True)
        shutil.rmtree(sweep_dir)
    save_config(cfg, sweep_dir)


def discard_followups(sweep_dir: str) -> None:
    """Remove the `followup` experiment and its trials' directories."""
    path = os.path.join(sweep_dir, "followup")
    if not os.path.isdir(path):
        return  # the search had not finished: there were no follow-ups yet
    trial_ids = [t.trial_id for t in ExperimentAnalysis(path).trials] if tune.Tuner.can_restore(path) else []
    for trial_id in trial_ids:
        shutil.rmtree(os.path.join(sweep_dir, "trials", trial_id), ignore_errors=True)
    shutil.rmtree(path)


def snapshot_export(cfg: Config, step: int) -> str:
    """The export of pretraining's snapshot at `step`; ConfigError if pretraining kept none."""
    path = os.path.join(snapshot_dir(os.path.abspath(cfg.run_dir), step), "export")
    if not os.path.isfile(os.path.join(path, "config.json")):
        fractions = any(p < 1 for p in cfg.sweep.pretrained_steps)
        raise ConfigError(f"sweep.pretrained_steps names step {step}, but pretraining kept no checkpoint there ({path} "
                          "is missing). Pretraining keeps these snapshots only when sweep.pretrained_steps is set "
                          "before it passes the step: pretrain again with it set (a new run.dir), or remove the step."
                          + (f" Its fractions count in pretrain.max_steps={cfg.pretrain.max_steps}: give the sweep "
                             "the max_steps pretraining ran." if fractions else ""))
    return path


FOLLOWUP_KEYS = ("num_seeds", "label_fractions", "pretrained_steps")  # what only the follow-up runs read


def results_key(cfg: Config, followups: bool = True) -> tuple:
    """The parts of a config a sweep's results depend on (the pretraining and data sections do not, given the
    pretrained model); with `followups=False`, those the search's trials depend on."""
    sweep_cfg = cfg.sweep if followups else dataclasses.replace(cfg.sweep, **{k: None for k in FOLLOWUP_KEYS})
    return cfg.run.seed, cfg.finetune, sweep_cfg, cfg.deepspeed


def run_followups(cfg: Config, sides: dict, sets: LabelledSets, sweep_dir: str, trials_dir: str, concurrent: int,
                  resume: bool, tracker_parent: dict | None = None) -> list[dict]:
    """Each side's winner again with more seeds and at each label fraction, all in one Tune experiment."""
    s = cfg.sweep
    plans, meta = followup_plans(cfg, sides)
    if not plans:
        return []
    for plan in plans:  # e.g. the winner's max_len at a new train_fraction: tokenized before the trials start
        sets.add(trial_config(cfg.to_dict(), plan))
    reruns = sum(m["kind"] == "seed" for m in meta)
    print(f"[sweep] follow-up runs of the winners: {len(plans)} ({reruns} seed reruns, label fractions "
          f"{[f for f in s.label_fractions if f < 1]}, pretrained steps {snapshot_steps(cfg)})", flush=True)
    results = run_tune(cfg, make_trial(cfg.to_dict(), sets, trials_dir, s.metric, s.mode, plans=plans,
                                           tracker_parent=tracker_parent),
                       sweep_dir=sweep_dir, name="followup",
                       param_space={"plan": tune.grid_search(list(range(len(plans))))},
                       num_samples=1, search_alg=BasicVariantGenerator(max_concurrent=concurrent),
                       sched=FIFOScheduler(), resume=resume)
    out = []
    for result in results:
        trial_id = _trial_id(result)
        best = best_checkpoint(os.path.join(trials_dir, trial_id), s.metric, s.mode)
        out.append({**meta[result.config["plan"]], "trial_id": trial_id, "value": best["metrics"][s.metric],
                    "config": plans[result.config["plan"]]})
    return out


def followup_plans(cfg: Config, sides: dict) -> tuple[list[dict], list[dict]]:
    """The follow-up runs' configurations and what each measures. Each winner's reruns are whole runs with new seeds:
    the seeds the verdict counts never include the search trial (see `summarize`)."""
    s = cfg.sweep
    plans, meta = [], []
    for side, found in sides.items():
        overrides = {**found["winner"]["config"], "finetune.init": side}
        for seed in range(1, s.num_seeds + 1):
            plans.append({**overrides, "run.seed": cfg.run.seed + seed})
            meta.append({"side": side, "kind": "seed", "seed": cfg.run.seed + seed})
        for fraction in s.label_fractions:
            if fraction < 1:
                plans.append(fraction_plan(overrides, fraction, cfg.finetune.epochs))
                meta.append({"side": side, "kind": "fraction", "fraction": fraction})
    for step in snapshot_steps(cfg):  # the pretrained winner from intermediate points of pretraining
        plans.append({**sides["pretrained"]["winner"]["config"], "finetune.init": "pretrained",
                      "finetune.pretrained": snapshot_export(cfg, step)})
        meta.append({"side": "pretrained", "kind": "pretrained_step", "step": step})
    return plans, meta


def fraction_plan(overrides: dict, fraction: float, epochs: int) -> dict:
    """A winner's configuration on a fraction of the labels, trained for about as many optimizer steps as on all of
    them (epochs / fraction): with the epochs alone kept, 10% of the labels meant 10% of the steps, and both sides ended
    below the majority class, which measures the step budget rather than what the labels are worth."""
    epochs = overrides.get("finetune.epochs", epochs)
    return {**overrides, "finetune.train_fraction": fraction, "finetune.epochs": math.ceil(epochs / fraction)}


def summarize(cfg: Config, sides: dict, followups: list[dict], num_val: int = 0) -> dict:
    """Each side's best, seed spread and label-fraction points; which side wins; one plain sentence of verdict.

    The verdict calls a difference a gain or a loss only beyond the noise: the larger of the two sides' seed spreads
    and, for an accuracy on `num_val` validation examples, twice the standard error of the difference of two such
    accuracies (sampling noise of the validation set, which one seed cannot show)."""
    s = cfg.sweep
    better = max if s.mode == "max" else min
    out = {"sides": {}}
    for side, found in sides.items():
        # The verdict uses the mean of the winner's reruns with new seeds, never the search trial: that one was picked
        # as the best of many runs, and a maximum flatters its side, the noisier side most (the winner's curse). With
        # no reruns (sweep.num_seeds=0) the search winners stand in, and the verdict says so. The side's model is
        # the best of all the winner's runs on all the labels, the search trial's included.
        search = {"trial_id": found["winner"]["trial_id"], "value": found["winner"]["best_metric"],
                  "config": found["winner"]["config"]}
        reruns = [f for f in followups if f["side"] == side and f["kind"] == "seed"]
        seeds = [run["value"] for run in reruns or [search]]
        top = better([search] + reruns, key=lambda run: run["value"])
        fractions = {str(f["fraction"]): f["value"] for f in followups if f["side"] == side and f["kind"] == "fraction"}
        if 1.0 in s.label_fractions:
            fractions["1.0"] = statistics.mean(seeds)
        out["sides"][side] = {"best": top["value"], "trial_id": top["trial_id"], "config": top["config"],
                              "search_best": found["winner"]["best_metric"],
                              "search_trial_id": found["winner"]["trial_id"], "seeds": seeds,
                              "seed_mean": statistics.mean(seeds),
                              "seed_std": statistics.stdev(seeds) if len(seeds) > 1 else 0.0,
                              "label_fractions": dict(sorted(fractions.items(), key=lambda kv: float(kv[0])))}
    out["side"] = better(out["sides"], key=lambda side: out["sides"][side]["best"])
    if snapshot_steps(cfg):  # accuracy against pretraining tokens; the last point is the final model (seed mean)
        tokens_per_step = cfg.pretrain.global_batch_size * cfg.data.seq_len
        points = {f["step"]: f["value"] for f in followups if f["kind"] == "pretrained_step"}
        final_step = max((r["step"] for r in read_metrics(cfg.run_dir) if "step" in r), default=cfg.pretrain.max_steps)
        points[final_step] = out["sides"]["pretrained"]["seed_mean"]
        out["pretrained_steps"] = [{"step": step, "tokens": step * tokens_per_step, "value": value}
                                   for step, value in sorted(points.items())]
        if len(points) > 1:
            pre = out["sides"]["pretrained"]
            out["steps_verdict"] = _steps_verdict(s, out["pretrained_steps"], pre["seed_std"], num_val)
    if "scratch" not in out["sides"]:
        out["verdict"] = "No from-scratch comparison was run (sweep.compare_scratch=false)."
        return out
    pre, scr = out["sides"]["pretrained"], out["sides"]["scratch"]
    spread = max(pre["seed_std"], scr["seed_std"])  # run-to-run noise, as the seeds show it
    gain, noise = _gain(s, pre["seed_mean"], scr["seed_mean"], spread, num_val)
    out["pretraining_gain"], out["noise"] = gain, noise
    if any(f["kind"] == "seed" for f in followups):
        runs = f"rerun with {len(pre['seeds'])} new seed{'s' if len(pre['seeds']) > 1 else ''}"
    else:
        runs = "as its search found it, which its selection flatters: sweep.num_seeds=0 reruns none"
    out["verdict"] = (f"{_verdict(gain, noise)}: {s.metric} {pre['seed_mean']:.4f} ± {pre['seed_std']:.4f} "
                      f"from the pretrained model "
                      f"vs {scr['seed_mean']:.4f} ± {scr['seed_std']:.4f} from scratch (each side's own best "
                      f"configuration {runs}; best single runs {pre['best']:.4f} vs {scr['best']:.4f}).")
    # The label curve, one sentence per fraction: one run a side, judged against the same kinds of noise.
    out["label_verdicts"] = {}
    for fraction, p in pre["label_fractions"].items():
        q = scr["label_fractions"].get(fraction)
        if q is None or fraction == "1.0":
            continue
        f_gain, f_noise = _gain(s, p, q, spread, num_val)
        verdict = _verdict(f_gain, f_noise)
        out["label_verdicts"][fraction] = (
            f"With {float(fraction):.0%} of the labels, {verdict[0].lower() + verdict[1:]}: {s.metric} {p:.4f} from "
            f"the pretrained model vs {q:.4f} from scratch ({f_gain:+.4f}; one run each).")
    return out


def _gain(s, pretrained: float, scratch: float, spread: float, num_val: int) -> tuple[float, float]:
    """(pretrained's gain over scratch in the metric's good direction, the noise it must exceed to count): the seed
    spread and, for an accuracy on `num_val` examples, twice the standard error of a difference of two accuracies."""
    gain = pretrained - scratch if s.mode == "max" else scratch - pretrained
    noise = spread
    if num_val and s.metric in ("val_accuracy", "val_f1"):
        noise = max(noise, 2 * math.sqrt((pretrained * (1 - pretrained) + scratch * (1 - scratch)) / num_val))
    return gain, noise


def _steps_verdict(s, points: list[dict], spread: float, num_val: int) -> str:
    """Whether the last stretch of pretraining still paid downstream: the final model (its seed mean) against the
    checkpoint before it, judged against the same noise as the pretrained-vs-scratch verdict."""
    before, final = points[-2], points[-1]
    gain, noise = _gain(s, final["value"], before["value"], spread, num_val)
    since = f"than from step {before['step']} ({gain:+.4f}"
    if gain > noise:
        return f"Pretraining past step {before['step']} still paid: {s.metric} better {since}); longer may pay more."
    if gain < -noise:
        return f"Pretraining past step {before['step']} cost: {s.metric} worse {since}); an earlier checkpoint won."
    return (f"Pretraining past step {before['step']} made no clear difference downstream (within the noise, "
            f"±{noise:.4f}: {gain:+.4f}).")


def _verdict(gain: float, noise: float) -> str:
    if gain > noise:
        return "Pretraining helped"
    if gain < -noise:
        return "Pretraining hurt"
    return f"Pretraining made no clear difference (within the noise, ±{noise:.4f})"


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or os.path.basename(result.path).split("_")[-1]


def leaderboard_rows(results, cfg: Config, sets: LabelledSets, trials_dir: str, side: str,
                     milestones: list[int] = ()) -> list[dict]:
    """One row per search trial. With ASHA (`milestones`, its rungs), each trial's log counts up to the step at which
    ASHA's decisions in trial order stop it: a stopped trial may have run on for a report or two before the stop
    reached it, and how far depends on timing."""
    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    histories = {_trial_id(result): read_metrics(os.path.join(trials_dir, _trial_id(result))) for result in results}
    stopped = stop_steps({trial_id: reported(history, metric, mode) for trial_id, history in histories.items()},
                         set(histories), list(milestones), cfg.sweep.reduction_factor)[0] if milestones else {}
    rows = []
    for result in results:
        trial_id = _trial_id(result)
        history = [r for r in histories[trial_id] if r.get("step", 0) <= stopped.get(trial_id, math.inf)]
        values = [r[metric] for r in history if metric in r]
        finite = [v for v in values if math.isfinite(v)]
        losses = [r["loss"] for r in history if "loss" in r]
        diverged = any(not math.isfinite(v) for v in values + losses) or any("stopped" in r for r in history)
        trial = trial_config(cfg.to_dict(), result.config)
        planned = finetune_schedule(trial, sets.num_train[data_key(trial)], sets.num_val).max_steps
        # A trial ASHA stops may still log the evaluation it was running, and one stopped at its last report has run
        # its whole schedule: it stopped early only if neither Tune's last step nor its own log reached the end.
        logged = max((r["step"] for r in history), default=0)
        ran = stopped[trial_id] if trial_id in stopped else max((result.metrics or {}).get("step", 0), logged)
        if result.error:
            status = "error"
        elif ran < planned:
            status = "stopped early"
        else:
            status = "finished"
        rows.append({
            "trial_id": trial_id, "side": side, "config": result.config, "status": status, "diverged": diverged,
            "final_metric": values[-1] if values else None,
            "best_metric": ((max if mode == "max" else min)(finite) if finite else None),
            "evaluations": len(values), "steps": logged, "planned_steps": planned,
            "wall_time_s": round(result.metrics.get("time_total_s", 0.0), 1) if result.metrics else None,
            "stop_step": stopped.get(trial_id),
        })
    return ranked(rows, mode)


def reported(history: list[dict], metric: str, mode: str) -> list[tuple[int, float]]:
    """What a trial's log says it reported to Tune: at each evaluation (each is a report), the step and its best
    finite value so far, larger better (what the trial ranks by, `best_<metric>`)."""
    best, out = None, []
    for row in history:
        value = row.get(metric)
        if value is None:
            continue
        if math.isfinite(value) and (best is None or (value > best if mode == "max" else value < best)):
            best = value
        if best is not None:
            out.append((row["step"], best if mode == "max" else -best))
    return out


def ranked(rows: list[dict], mode: str) -> list[dict]:
    """Best first; trials with no finite metric last; ties by trial id (the same order however the results came)."""
    return sorted(rows, key=lambda r: (r["best_metric"] is None, -(r["best_metric"] or 0) if mode == "max"
                                       else (r["best_metric"] or 0), r["trial_id"]))


def write_leaderboard(rows: list[dict], path: str) -> None:
    keys = sorted({k for r in rows for k in r["config"]})
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial_id", "side", *keys, "status", "diverged", "final_metric", "best_metric",
                         "evaluations", "steps", "planned_steps", "wall_time_s"])
        for i, r in enumerate(rows, 1):
            writer.writerow([i, r["trial_id"], r["side"], *[r["config"].get(k) for k in keys], r["status"],
                             r["diverged"], r["final_metric"], r["best_metric"], r["evaluations"], r["steps"],
                             r["planned_steps"], r["wall_time_s"]])
    os.replace(path + ".tmp", path)
