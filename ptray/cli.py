"""The `ptray` command: each subcommand maps to one function; nothing else lives here.

    ptray prepare  --config tiny [key=value ...]
    ptray pretrain --config tiny [key=value ...]
    ptray finetune --config tiny [key=value ...]
    ptray sweep    --config tiny [--resume] [key=value ...]
    ptray pipeline --config tiny [key=value ...]
    ptray report   RUN_DIR
    ptray config show tiny [key=value ...]
    ptray config docs                      # the configuration reference, as in README.md
"""

from __future__ import annotations

import argparse
import os
import sys

from ptray.config import load_config, reference_tables, resolved
from ptray.errors import UserError
from ptray.trackers import check_loggers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("prepare", "clean, tokenize and pack a corpus into Parquet token shards"),
                        ("pretrain", "pretrain with Ray Train + DeepSpeed and export to Hugging Face format"),
                        ("finetune", "finetune the pretrained export (classification or SFT)"),
                        ("sweep", "Ray Tune sweep of finetuning hyperparameters; exports the best model"),
                        ("pipeline", "prepare -> pretrain -> sweep -> report in one driver")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help="built-in config name (tiny, gpt2-124m, ...) or YAML path")
        p.add_argument("--address", default="", help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")
        p.add_argument("--verbose", action="store_true",
                       help="show Ray Train's and Tune's own messages too (else they stay in Ray's log files)")
        if name == "sweep":
            p.add_argument("--resume", action="store_true",
                           help="continue an interrupted sweep (or, when only sweep.num_seeds, "
                           "label_fractions or pretrained_steps changed, redo just its follow-ups)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.max_steps=50")
    p = sub.add_parser("report", help="write report.md with plots for a run directory")
    p.add_argument("run_dir")
    show = sub.add_parser("config", help="print a fully resolved config").add_subparsers(dest="action", required=True)
    p = show.add_parser("show", help="print the resolved YAML of a config")
    p.add_argument("config", help="built-in config name or YAML path")
    p.add_argument("overrides", nargs="*")
    show.add_parser("docs", help="print the configuration reference (every key, default, meaning) as Markdown")
    args = parser.parse_args(argv)

    try:
        if args.command == "config" and args.action == "docs":
            print(reference_tables(), end="")
            return 0
        if args.command == "config":
            print(resolved(load_config(args.config, args.overrides)).to_yaml(), end="")
            return 0
        if args.command == "report":
            from ptray.report import report

            report(args.run_dir)
            saved = os.path.join(args.run_dir, "config.yaml")
            if os.path.exists(saved):  # a run that logs to trackers gets the report there too
                from ptray.trackers import log_report

                log_report(load_config(saved), args.run_dir)
            return 0
        if args.verbose:
            os.environ["PTRAY_VERBOSE"] = "1"
        overrides = list(args.overrides) + ([f"cluster.address={args.address}"] if args.address else [])
        cfg = load_config(args.config, overrides)
        check_loggers(cfg)  # a missing tracker or an MLflow server that does not answer: before any work
        from ptray.session import ray_session  # imports Ray: keep `ptray config` fast

        closing = None
        with ray_session(cfg):
            if args.command == "prepare":
                from ptray.data.prepare import prepare

                prepare(resolved(cfg))
            elif args.command == "pretrain":
                from ptray.pretrain import pretrain

                pretrain(cfg)
            elif args.command == "finetune":
                from ptray.finetune import finetune

                finetune(cfg)
            elif args.command == "sweep":
                from ptray.sweep import sweep

                sweep(cfg, resume=args.resume)
            elif args.command == "pipeline":
                from ptray.pipeline import pipeline, summary

                closing = summary(pipeline(cfg))
        if closing:
            print(closing, flush=True)
        return 0
    except UserError as e:
        print(f"ptray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # errors raised inside Ray workers arrive wrapped; unwrap user mistakes
        user_error = _find_user_error(e)
        if user_error is None:
            raise
        print(f"ptray {args.command}: error: {user_error}", file=sys.stderr)
        return 2


def _find_user_error(error: BaseException) -> UserError | None:
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        stack += (list(getattr(e, "worker_failures", {}).values())
                  if isinstance(getattr(e, "worker_failures", None), dict) else [])
    return None


if __name__ == "__main__":
    sys.exit(main())
