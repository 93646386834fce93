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

    lines += _data_summary(run_dir)
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
            ax.plot([r["step"] for r in history], [r[metric] for r in history], style, marker="o",
                    color="C0" if row.get("side", "pretrained") == "pretrained" else "C7",
                    label=f"{row['trial_id']} ({row.get('side', 'pretrained')}, {row['status']})")
        ax.set(xlabel="optimizer step", ylabel=metric,
               title="Sweep: every trial's metric (blue: pretrained, grey: scratch; dashed: stopped by ASHA)")
        ax.legend(fontsize=6)
        _save(fig, figures, "sweep_trials.png")
        lines += ["## Finetuning sweep", "",
                  f"{len(table)} trials; {sum(r['status'] == 'stopped early' for r in table)} stopped early by the "
                  "scheduler. Trials that stop early release their workers for the next ones.", "",
                  "![sweep trials](report/sweep_trials.png)", "", _markdown_table(table), ""]
        if best and best.get("cut_note"):
            lines += [f"**Inputs cut short:** {best['cut_note']}", ""]
        if best:
            lines += [f"Best: trial `{best['trial_id']}` ({best.get('side', 'pretrained')} side), {metric} = "
                      f"{best['value']:.4f} at step {best['step']} with `{best['config']}`; exported to `best/`.", ""]
        sides = (best or {}).get("sides", {})
        if "scratch" in sides:
            lines += _pretraining_verdict(plt, figures, best, metric)
        if best and best.get("pretrained_steps"):
            points = best["pretrained_steps"]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([p["tokens"] for p in points], [p["value"] for p in points], "o-", label="from pretrained")
            if "scratch" in sides:
                ax.axhline(sides["scratch"]["seed_mean"], color="C7", ls="--", label="from scratch (seed mean)")
            ax.set(xlabel="pretraining tokens", ylabel=metric, title="Was pretraining long enough?")
            ax.legend()
            _save(fig, figures, "pretraining_steps.png")
            lines += ["### Was pretraining long enough?", "",
                      "The pretrained winner's configuration finetuned from intermediate pretraining checkpoints: " +
                      "; ".join(f"step {p['step']} ({p['tokens']:,} tokens): {p['value']:.4f}" for p in points) +
                      f". {best.get('steps_verdict', '')}", "",
                      "![pretraining steps](report/pretraining_steps.png)", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"[report] {path}", flush=True)
    return path


def _pretraining_verdict(plt, figures: str, best: dict, metric: str) -> list[str]:
    """Pretrained vs scratch, each side's own best configuration: seed spread, and the label-fraction curve."""
    sides = best["sides"]
    fig, (ax_seeds, ax_fractions) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (side, color) in enumerate([("pretrained", "C0"), ("scratch", "C7")]):
        seeds = sides[side]["seeds"]
        ax_seeds.bar(i, sides[side]["seed_mean"], yerr=sides[side]["seed_std"], color=color, capsize=6)
        ax_seeds.plot([i] * len(seeds), seeds, "k.", zorder=3)
        ax_seeds.text(i, sides[side]["seed_mean"], f"{sides[side]['seed_mean']:.3f}", ha="left", va="bottom")
        fractions = sides[side]["label_fractions"]
        ax_fractions.plot([float(f) for f in fractions], list(fractions.values()), "o-", color=color,
                          label=f"from {side}")
    ax_seeds.set(xticks=[0, 1], xticklabels=["from pretrained", "from scratch"], ylabel=metric,
                 title=f"Each side's best configuration (the verdict's {len(sides['pretrained']['seeds'])} runs)")
    ax_fractions.set(xlabel="fraction of the labelled training set", ylabel=metric, xscale="log",
                     title="Labels needed: each side's winner at fewer labels")
    ax_fractions.legend()
    _save(fig, figures, "pretrained_vs_scratch.png")
    curve = "; ".join(f"{float(f):g} of the labels: {sides['pretrained']['label_fractions'][f]:.4f} pretrained vs "
                      f"{sides['scratch']['label_fractions'].get(f, float('nan')):.4f} scratch"
                      for f in sides["pretrained"]["label_fractions"])
    by_fraction = " ".join(best.get("label_verdicts", {}).values())  # older best.json files have none
    return ["### Did pretraining pay off?", "", best["verdict"], "", *([by_fraction, ""] if by_fraction else []),
            f"Label fractions (each side's winner, one run per point; 1.0 is the seed mean): {curve}.", "",
            "![pretrained vs scratch](report/pretrained_vs_scratch.png)", ""]


def _data_summary(run_dir: str) -> list[str]:
    """What `prepare` made of the corpus (documents, tokens, duplicates dropped), when the run's data is at hand."""
    from ptray.config import load_config
    from ptray.data.manifest import read_manifest

    saved = os.path.join(run_dir, "config.yaml")
    prepared = load_config(saved).prepared_dir if os.path.exists(saved) else os.path.join(run_dir, "data")
    try:
        manifest = read_manifest(prepared)
    except Exception:  # no prepared data (streamed, or elsewhere and gone): nothing to say
        return []
    dedup = manifest.settings.get("data.dedup")
    removed = (f"; {manifest.num_near_duplicates:,} near-duplicate documents dropped (MinHash, similarity >= "
               f"{manifest.settings.get('data.minhash_threshold')})" if dedup == "minhash" else "")
    return ["## Data", "",
            f"{manifest.num_docs.get('train', 0):,} training and {manifest.num_docs.get('val', 0):,} validation "
            f"documents, {manifest.num_doc_tokens:,} tokens (vocabulary {manifest.vocab_size:,}); duplicates: "
            f"{dedup}{removed}.", ""]


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
