"""`ptray pipeline`: prepare -> pretrain -> finetuning sweep -> report, in one driver and one Ray session.

    ptray pipeline --config tiny         # the README's main job: built-in corpus and task, CPU only
"""

from __future__ import annotations

import os

from ptray.config import Config, check_pretrained_steps, check_space_values, resolved
from ptray.pretrain import pretrain
from ptray.report import report
from ptray.sweep import sweep
from ptray.trackers import log_report


def pipeline(cfg: Config) -> dict:
    """Run every stage (Ray must be up); re-running resumes the pretraining and reuses prepared data."""
    cfg = resolved(cfg)
    check_pretrained_steps(cfg)
    check_space_values(cfg)  # a space value no trial can run stops here, not after the pretraining
    pretrained = pretrain(cfg)  # prepares the data first when there is none
    result = sweep(cfg)
    report_path = report(cfg.run_dir)
    log_report(cfg, cfg.run_dir)
    return {"pretrain": pretrained, "sweep": result, "report": report_path, "run_dir": os.path.abspath(cfg.run_dir)}


def summary(outcome: dict) -> str:
    """The closing lines of `ptray pipeline`. The CLI prints them after the Ray session has closed: Ray forwards the
    workers' last log lines a few seconds late (it gathers repeated lines first), and they would follow them."""
    best = outcome["sweep"].best
    return (f"\n[pipeline] done in {outcome['run_dir']}\n"
            f"  pretrained model : {outcome['pretrain'].export_dir}\n"
            f"  leaderboard      : {outcome['sweep'].leaderboard}\n"
            f"  best model       : {outcome['sweep'].best_dir}  ({best['metric']} = {best['value']:.4f})\n"
            f"  report           : {outcome['report']}")
