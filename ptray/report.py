"""`ptray report RUN_DIR`: `report.md` with PNG plots of pretraining and the sweep, readable without having run it.

    ptray report runs/tiny
"""

from __future__ import annotations

import csv
import json
import os

from ptray.errors import DataError
from ptray.metrics import read_metrics


def report(run_dir: str) -> str:
    """Write `<run_dir>/report.md` and `<run_dir>/report/*.png`; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    sweep_dir = os.path.join(run_dir, "sweep")
    if not rows and not os.path.isdir(sweep_dir):
        raise DataError(f"{run_dir!r} has neither metrics.jsonl nor sweep/; give the run directory of a "
                        "`ptray pretrain`, `sweep` or `pipeline` run.")
    figures = os.path.join(run_dir, "report")
    os.makedirs(figures, exist_ok=True)
    lines = [f"# ptray run report: `{os.path.basename(os.path.abspath(run_dir))}`", ""]

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    if train:
        fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax_loss.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
            ax_ppl.plot([r["tokens"] for r in evals], [r["val_ppl"] for r in evals], "o-", color="C1")
        ax_loss.set(xlabel="tokens seen", ylabel="loss", title="Pretraining loss")
        ax_loss.legend()
        ax_ppl.set(xlabel="tokens seen", ylabel="validation perplexity", title="Validation perplexity", yscale="log")
        _save(fig, figures, "pretrain_loss.png")
        fig, (ax_lr, ax_tps) = plt.subplots(1, 2, figsize=(11, 3.5))
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
        ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning rate schedule")
        ax_tps.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
        ax_tps.set(xlabel="step", ylabel="tokens/s (all workers)", title="Throughput")
        _save(fig, figures, "pretrain_lr_throughput.png")
        last = train[-1]
        lines += ["## Pretraining", "",
                  f"{last['step']} steps, {last['tokens']:,} tokens; final train loss {last['loss']:.3f}" +
                  (f", validation loss {evals[-1]['val_loss']:.3f} (perplexity {evals[-1]['val_ppl']:.2f})"
                   if evals else "") +
                  f"; {last['tokens_per_s']:,.0f} tokens/s at the end, MFU {100 * last['mfu']:.1f}%.", "",
                  "![pretraining loss](report/pretrain_loss.png)", "",
                  "![learning rate and throughput](report/pretrain_lr_throughput.png)", ""]

    leaderboard = os.path.join(sweep_dir, "leaderboard.csv")
    if os.path.exists(leaderboard):
        table = list(csv.DictReader(open(leaderboard)))
        best = json.load(open(os.path.join(run_dir, "best.json"))) if os.path.exists(
            os.path.join(run_dir, "best.json")) else None
        metric = best["metric"] if best else "val_accuracy"
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for row in table:
            history = [r for r in read_metrics(os.path.join(sweep_dir, "trials", row["trial_id"])) if metric in r]
            style = "-" if row["status"] == "finished" else "--"
            ax.plot(range(1, len(history) + 1), [r[metric] for r in history], style, marker="o",
                    label=f"{row['trial_id']} ({row['status']})")
        ax.set(xlabel="evaluation (Tune training iteration)", ylabel=metric,
               title="Sweep: every trial's metric (dashed: stopped early by ASHA)")
        ax.legend(fontsize=7)
        _save(fig, figures, "sweep_trials.png")
        lines += ["## Finetuning sweep", "",
                  f"{len(table)} trials; {sum(r['status'] == 'stopped early' for r in table)} stopped early by the "
                  "scheduler. Trials that stop early release their workers for the next ones.", "",
                  "![sweep trials](report/sweep_trials.png)", "", _markdown_table(table), ""]
        if best:
            lines += [f"Best: trial `{best['trial_id']}`, {metric} = {best['value']:.4f} at step {best['step']} "
                      f"with `{best['config']}`; exported to `best/`.", ""]
            if "scratch" in best:
                fig, ax = plt.subplots(figsize=(5, 3.5))
                values = [best["value"], best["scratch"]["value"]]
                ax.bar(["from pretrained", "from scratch"], values, color=["C0", "C7"])
                ax.set(ylabel=metric, title="What pretraining bought (same hyperparameters)")
                for i, v in enumerate(values):
                    ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
                _save(fig, figures, "pretrained_vs_scratch.png")
                lines += ["### Pretrained vs scratch", "",
                          f"The best configuration trained from random initialization reaches {metric} = "
                          f"{best['scratch']['value']:.4f}, against {best['value']:.4f} from the pretrained model "
                          f"(difference {best['pretraining_gain']:+.4f}).", "",
                          "![pretrained vs scratch](report/pretrained_vs_scratch.png)", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"[report] {path}", flush=True)
    return path


def _save(fig, directory: str, name: str) -> None:
    fig.tight_layout()
    fig.savefig(os.path.join(directory, name), dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    return "\n".join(out)


def _fmt(value: str) -> str:
    try:
        number = float(value)
        return f"{number:.4g}" if not number.is_integer() else str(int(number))
    except (TypeError, ValueError):
        return str(value)
