"""ASHA (asynchronous successive halving, Li et al. 2020) whose decisions do not depend on timing.

Tune's ASHAScheduler compares a trial's result at a rung with whatever results happen to have reached that rung before
it. With trials running side by side, the same sweep then stops different trials from one run to the next: the main
job had two outcomes (`best/` 0.750 or 0.431) depending on which of two concurrent trials reported first. Here a
trial's result at a rung is compared only with those of the trials created before it (by trial id), and only once
each of them has reached the rung or ended: the decisions ASHA makes when the trials run one at a time, however they
interleave. A trial whose decision has to wait runs on meanwhile; if it is then stopped, what it did after its rung is
not counted (`stop_steps`, which the leaderboard uses on the trials' logs).

As in Tune's ASHA: rungs at grace_period x reduction_factor^k steps below max_t; at a rung a trial is stopped when its
value is below the (1 - 1/reduction_factor) quantile of the earlier trials' values there; the first trial to reach a
rung always goes on. A rung's value is a trial's first report at or past it. A trial that reaches max_t (the longest
trial's length) is not stopped there: it ends on its own.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


def rungs(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """The rungs' steps, ascending: Tune's ASHA's milestones (one bracket) below max_t, where all trials end anyway."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [m for k in range(count) if (m := math.ceil(grace_period * reduction_factor ** k)) < max_t]  # steps: ints


def stop_steps(reports: dict[str, list[tuple[int, float]]], ended: set[str], milestones: list[int],
               reduction_factor: float) -> tuple[dict[str, int], set[str]]:
    """The decisions for trials that report (step, value) pairs, larger values better, trials ordered by id.

    Returns ({trial: the step of the report at which it is stopped}, the trials with a decision still waiting on an
    earlier trial that is running). `ended`: the trials that will report no more."""
    order = sorted(reports)
    first = {trial: {m: next((s, v) for s, v in reports[trial] if s >= m) for m in milestones
                     if any(s >= m for s, _ in reports[trial])} for trial in order}
    passed: dict[str, set[int]] = {trial: set() for trial in order}  # rungs a trial went on from
    stopped: dict[str, int] = {}  # trial -> the rung it stopped at

    def rung_value(earlier: str, m: int) -> tuple[bool, float | None]:
        """(known, its value at rung m or None if it never gets there)."""
        if earlier in stopped and stopped[earlier] < m:
            return True, None
        if any(r < m and r not in passed[earlier] for r in first[earlier]):
            return False, None  # its own decision at a lower rung is still open
        if m in first[earlier]:
            return True, first[earlier][m][1]
        return earlier in ended, None

    changed = True
    while changed:
        changed = False
        for i, trial in enumerate(order):
            for m in sorted(first[trial]):
                if trial in stopped or m in passed[trial]:
                    continue
                known = [rung_value(earlier, m) for earlier in order[:i]]
                if not all(k for k, _ in known):
                    break  # wait for the earlier trials at this rung
                values = [v for _, v in known if v is not None]
                cutoff = np.nanpercentile(values, (1 - 1 / reduction_factor) * 100) if values else None
                if cutoff is not None and first[trial][m][1] < cutoff:
                    stopped[trial] = m
                else:
                    passed[trial].add(m)
                changed = True
    waiting = {t for t in order if t not in stopped and any(m not in passed[t] for m in first[t])}
    return {trial: first[trial][m][0] for trial, m in stopped.items()}, waiting


class OrderedASHA(FIFOScheduler):
    """A Tune scheduler: ASHA with the decisions of `stop_steps`. `time_attr` must grow with each report (ptray reports
    the optimizer step).

    `logged(trial_id)`: the (step, value) reports a trial's own log holds, larger values better. Tune restores a
    resumed sweep's scheduler as it was created, empty; each trial added then brings what it reported before the
    interruption, so a resumed sweep makes the decisions an uninterrupted one makes."""

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int, reduction_factor: float,
                 logged: Callable[[str], list[tuple[int, float]]] = lambda trial_id: []):
        super().__init__()
        self.time_attr, self.max_t, self.reduction_factor, self.logged = time_attr, max_t, reduction_factor, logged
        self.milestones = rungs(grace_period, max_t, reduction_factor)
        self.sign = 1.0  # the metric's name is Tune's `_metric`, set by set_search_properties
        self.reports: dict[str, list[tuple[int, float]]] = {}
        self.ended: set[str] = set()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self.sign = metric or self._metric, -1.0 if mode == "min" else 1.0
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        self.reports.setdefault(trial.trial_id, list(self.logged(trial.trial_id)))
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # a finished trial of a resumed sweep
            self.ended.add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._record(trial, result)
        # Never a STOP at max_t, unlike Tune's ASHA: a ptray trial ends by itself after its last report (a decision
        # made only then is in `decisions` all the same), and a STOP there had Tune kill its workers while they
        # closed their experiment trackers (W&B lost the run's end).
        if result.get(self.time_attr, 0) < self.max_t and trial.trial_id in self.decisions()[0]:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._record(trial, result)
        self.ended.add(trial.trial_id)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.ended.add(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.ended.add(trial.trial_id)

    def decisions(self) -> tuple[dict[str, int], set[str]]:
        return stop_steps(self.reports, self.ended, self.milestones, self.reduction_factor)

    def debug_string(self) -> str:
        stopped, waiting = self.decisions()
        return f"Ordered ASHA: rungs {self.milestones}, {len(stopped)} stopped, {len(waiting)} waiting"

    def _record(self, trial, result: dict) -> None:
        value, step = (result or {}).get(self._metric), (result or {}).get(self.time_attr)
        reports = self.reports.setdefault(trial.trial_id, [])
        if value is not None and step is not None and (not reports or step > reports[-1][0]):
            reports.append((int(step), self.sign * float(value)))
