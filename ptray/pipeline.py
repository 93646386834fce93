"""`ptray pipeline`: prepare -> pretrain -> finetuning sweep -> report, in one driver and one Ray session.

    ptray pipeline --config tiny         # the README's main job: built-in corpus and task, CPU only
"""

from __future__ import annotations

import os

from ptray.config import Config, check_pretrained_steps, resolved
from ptray.pretrain import pretrain
from ptray.report import report
from ptray.sweep import sweep
from ptray.trackers import log_report


def pipeline(cfg: Config) -> dict:
    """Run every stage (Ray must be up); re-running resumes the pretraining and reuses prepared data."""
    cfg = resolved(cfg)
    check_pretrained_steps(cfg)
    pretrained = pretrain(cfg)  # prepares the data first when there is none
    result = sweep(cfg)
    report_path = report(cfg.run_dir)
    log_report(cfg, cfg.run_dir)
    run_dir = os.path.abspath(cfg.run_dir)
    print(f"\n[pipeline] done in {run_dir}\n"
          f"  pretrained model : {pretrained.export_dir}\n"
          f"  leaderboard      : {result.leaderboard}\n"
          f"  best model       : {result.best_dir}  ({result.best['metric']} = {result.best['value']:.4f})\n"
          f"  report           : {report_path}", flush=True)
    return {"pretrain": pretrained, "sweep": result, "report": report_path}
