"""Finetuning and sweeps on a real local Ray: classification and SFT on a tiny pretrained export, an ASHA sweep from
the pretrained model and from scratch with its follow-up runs, the best-model export, the report, an interrupted and
resumed sweep, and bad input."""

import csv
import dataclasses
import glob
import itertools
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import tiny_config
from ptray.config import load_config, trial_config
from ptray.data.builtin import CATEGORIES
from ptray.errors import ConfigError, DataError
from ptray.data.tokenizer import load_tokenizer
from ptray.finetune import finetune, freeze, load_labelled, prepare_finetune
from ptray.metrics import read_metrics
from ptray.pretrain import pretrain
from ptray.report import report
from ptray.sweep import sweep
from ptray.trial import finetune_schedule

FINETUNE_FAST = ["finetune.builtin_examples=400", "finetune.epochs=1", "finetune.eval_every=4"]


@pytest.fixture(scope="module")
def pretrained_run(ray_local, tmp_path_factory):
    """A short pretraining run whose export the finetuning tests start from."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    pretrain(tiny_config(run_dir, "pretrain.max_steps=40", "pretrain.ckpt_every=40", "pretrain.eval_every=40",
                         "sweep.pretrained_steps=[20]"))  # also keeps the weights at step 20
    return run_dir


def _evals(path, metric):
    return [r[metric] for r in read_metrics(path) if metric in r]


def _keyword_task(path) -> str:
    """A labelled file whose label is which of three words the text holds: learnable in a few steps."""
    import random

    rng = random.Random(0)
    words = ["the", "a", "walked", "sold", "to", "from", "and", "is", "said", "one", "two", "three"]
    rows = []
    for i in range(400):
        label = rng.choice(["bread", "rope", "fish"])
        text = [rng.choice(words) for _ in range(6)] + [label]  # last: the token the classification head reads
        rows.append({"text": " ".join(text), "label": label})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_classification_finetune_improves_and_exports(pretrained_run, tmp_path):
    data = _keyword_task(tmp_path / "keywords.jsonl")
    cfg = tiny_config(pretrained_run, *FINETUNE_FAST, f"finetune.train_files=[{data}]", "finetune.epochs=3")
    out = finetune(cfg)
    accuracy = _evals(out["train_dir"], "val_accuracy")
    assert max(accuracy) > 0.6 and max(accuracy) > accuracy[0], accuracy  # 3 classes: chance is ~0.33
    model = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(pretrained_run, "finetune-classification", "export"), trust_remote_code=True)  # as trained: mean
    assert set(model.config.id2label.values()) == {"bread", "rope", "fish"}
    assert out["best"]["metrics"]["val_accuracy"] == max(accuracy)
    # Rerunning with another learning rate is a new run, never the older run's results returned again.
    changed = finetune(tiny_config(pretrained_run, *FINETUNE_FAST, f"finetune.train_files=[{data}]",
                                   "finetune.epochs=3", "finetune.lr=3e-4"))
    assert changed["train_dir"] != out["train_dir"] and _evals(out["train_dir"], "val_accuracy") == accuracy
    assert _evals(changed["train_dir"], "val_accuracy") != accuracy


def test_sft_finetune_lowers_response_loss(pretrained_run, tmp_path):
    cfg = tiny_config(pretrained_run, "finetune.task=sft", "finetune.max_len=24", *FINETUNE_FAST)
    losses = _evals(finetune(cfg)["train_dir"], "val_loss")
    assert losses[-1] < losses[0] - 0.3, losses


def test_freeze_layers_and_train_fraction(pretrained_run):
    cfg = tiny_config(pretrained_run, "finetune.train_fraction=0.25", "finetune.freeze_layers=1")
    from ptray.finetune import finetune_model, transformers_model
    from ptray.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(pretrained_run, "export"))
    full = load_labelled(tiny_config(pretrained_run), tokenizer)
    part = load_labelled(cfg, tokenizer)
    assert len(part.train["labels"]) == int(len(full.train["labels"]) * 0.25)
    assert torch.equal(part.val["labels"], full.val["labels"])  # the validation set does not shrink
    assert torch.equal(load_labelled(cfg, tokenizer).train["input_ids"], part.train["input_ids"])  # seeded
    model = transformers_model(finetune_model(cfg, os.path.join(pretrained_run, "export"), len(CATEGORIES),
                                              full.id2label))  # the plain model inside mean pooling's wrapper
    freeze(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.")) for n in trainable)
    assert any(n.startswith("transformer.h.1.") for n in trainable) and "score.weight" in trainable


def test_a_max_len_that_cuts_the_examples_is_reported(pretrained_run, capsys):
    """A finetune.max_len shorter than most examples is named, with the length that would keep 95% of them whole."""
    from ptray.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(pretrained_run, "export"))
    assert load_labelled(tiny_config(pretrained_run), tokenizer).cut_note == ""  # tiny's 128 tokens fit its task
    cut = load_labelled(tiny_config(pretrained_run, "finetune.max_len=4"), tokenizer)
    lengths = cut.train["attention_mask"].sum(1)
    count = int(re.search(r"([\d,]+) of [\d,]+ training examples", cut.cut_note).group(1).replace(",", ""))
    assert lengths.max() == 4 and 0.05 * len(lengths) < count <= (lengths == 4).sum()  # only full rows were cut
    assert "finetune.max_len=4 tokens" in cut.cut_note
    assert int(re.search(r"95% in (\d+)\.", cut.cut_note).group(1)) > 4
    assert cut.cut_note in capsys.readouterr().out


def test_builtin_task_holds_out_whole_words(pretrained_run):
    """The built-in task's validation words never occur in training: only the corpus can teach what they name."""
    from ptray.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(pretrained_run, "export"))
    data = load_labelled(tiny_config(pretrained_run), tokenizer)
    world = {w for words in CATEGORIES.values() for w in words}

    def words(split):
        texts = tokenizer.batch_decode(split["input_ids"], skip_special_tokens=True)
        return {word for text in texts for word in text.split() if word in world}

    train, val = words(data.train), words(data.val)
    assert len(val) >= 5 and len(train) >= 40 and not train & val
    assert set(data.id2label.values()) == set(CATEGORIES)


def test_bad_labelled_input(pretrained_run, tmp_path):
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("\n".join(json.dumps({"text": f"example {i}", "label": "a"}) for i in range(20)))
    with pytest.raises(DataError, match="at least 2 classes"):
        prepare_finetune(tiny_config(pretrained_run, f"finetune.train_files=[{one_class}]"))
    no_label = tmp_path / "nolabel.jsonl"
    no_label.write_text("\n".join(json.dumps({"text": f"example {i}", "y": i % 2}) for i in range(20)))
    with pytest.raises(DataError, match="no field 'label'"):
        prepare_finetune(tiny_config(pretrained_run, f"finetune.train_files=[{no_label}]"))
    gaps = tmp_path / "gaps.jsonl"  # text missing or not a string in later records, not only the first
    gaps.write_text("\n".join(json.dumps({"text": f"example {i}" if i % 7 else {"nested": i}, "label": "ab"[i % 2]})
                               for i in range(1, 40)))
    with pytest.raises(DataError, match=r"\d+ of \d+ training examples have no text in text \(first: .*nested"):
        prepare_finetune(tiny_config(pretrained_run, f"finetune.train_files=[{gaps}]", "finetune.group_field="))
    with pytest.raises(ConfigError, match="no pretrained model"):
        prepare_finetune(tiny_config(pretrained_run, f"finetune.pretrained={tmp_path}/missing"))
    with pytest.raises(ConfigError, match="not reported by finetune.task"):
        sweep(tiny_config(pretrained_run, "sweep.metric=val_bleu"))
    with pytest.raises(DataError, match="finetune.group_field='author' is not a field"):
        prepare_finetune(tiny_config(pretrained_run, f"finetune.train_files=[{one_class}]",
                                     "finetune.group_field=author"))
    with pytest.raises(ConfigError, match="pretraining kept no checkpoint there"):
        sweep(tiny_config(pretrained_run, "sweep.pretrained_steps=[10]"))  # pretraining kept only step 20


@pytest.fixture(scope="module")
def swept(pretrained_run):
    # One worker per trial: 11 trials of 20 steps are mostly process start-up on 2 cores, and a trial's workers start
    # in parallel with other trials' anyway. Multi-worker trials: the cluster job (test_cluster).
    # Optuna's TPE, for real (random search: the cluster job's pipeline; grid: the interrupted-sweep test).
    cfg = tiny_config(pretrained_run, *FINETUNE_FAST, "cluster.num_workers=1", "sweep.num_samples=3",
                      "sweep.searcher=optuna",
                      "sweep.compare_scratch=true",
                      "sweep.num_seeds=1", "sweep.label_fractions=[0.5,1.0]", "sweep.pretrained_steps=[20]",
                      "sweep.space={finetune.lr: {loguniform: [1e-4, 3e-3]}, finetune.freeze_layers: {choice: [0, 2]}, "
                      "finetune.max_len: {choice: [4, 128]}}")
    return cfg, sweep(cfg)


def test_sweep_searches_both_sides_and_asha_waits_for_warmup(swept, pretrained_run):
    cfg, result = swept
    rows = list(csv.DictReader(open(result.leaderboard)))
    assert len(rows) == 6 and [r["side"] for r in rows].count("scratch") == 3  # the same budget on both sides
    trial_dirs = set(os.listdir(os.path.join(pretrained_run, "sweep", "trials")))
    assert {r["trial_id"] for r in rows} <= trial_dirs  # (the rest are the winners' follow-up runs)
    # A stopped trial ran at least to the first rung, a quarter of the longest trial (past its warm-up), and stopped
    # before its planned end; every other trial ran to its end. (Which trials stop does not depend on the order in
    # which concurrent trials report: see test_units' ordered-ASHA test. Optuna's choices do.)
    longest = max(int(r["planned_steps"]) for r in rows)
    for r in rows:
        if r["status"] == "stopped early":
            assert math.ceil(longest / 4) <= int(r["steps"]) < int(r["planned_steps"]), r
        else:
            assert r["status"] == "finished" and int(r["steps"]) == int(r["planned_steps"]), r
    for r in rows:  # each row's metrics agree with that trial's own history, up to the step ASHA stopped it at
        trial_dir = os.path.join(pretrained_run, "sweep", "trials", r["trial_id"])
        history = [m["val_accuracy"] for m in read_metrics(trial_dir)
                   if "val_accuracy" in m and m["step"] <= int(r["steps"])]
        assert float(r["best_metric"]) == pytest.approx(max(history)) and int(r["evaluations"]) == len(history)
        # the swept max_len really changed the data the trial trained on: at 4 every example is cut to 4 tokens; at
        # 128 none is, and each batch is cut to its longest example (the built-in ones have 2-11 tokens)
        step_rows = [m for m in read_metrics(trial_dir) if "loss" in m]
        positions_per_example = step_rows[0]["tokens"] / (step_rows[0]["step"] * 16)
        assert positions_per_example == 4 if r["finetune.max_len"] == "4" else 4 < positions_per_example < 32
    # Tune's ASHA and Optuna rank trials by each report's best_val_accuracy: the running best of its evaluations.
    results = glob.glob(os.path.join(pretrained_run, "sweep", "search*", "*", "result.json"))
    assert len(results) == 6
    for path in results:
        reports = [json.loads(line) for line in open(path)]
        values = [r["val_accuracy"] for r in reports]
        assert values and [r["best_val_accuracy"] for r in reports] == list(itertools.accumulate(values, max)), path
    assert {r["finetune.max_len"] for r in rows} == {"4", "128"}
    for side in ("pretrained", "scratch"):  # each side's search starts from the configured point (lr 1e-3, 0, 128)
        assert any(r["side"] == side and float(r["finetune.lr"]) == 1e-3 and r["finetune.freeze_layers"] == "0"
                   and r["finetune.max_len"] == "128" for r in rows), rows
    sides = result.best["sides"]  # the leaderboard ranks the search trials; best/ may be a winner's rerun too
    assert float(rows[0]["best_metric"]) == pytest.approx(max(side["search_best"] for side in sides.values()))
    assert result.best["value"] == max(side["best"] for side in sides.values())


def test_best_model_reproduces_reported_metric(swept, pretrained_run):
    cfg, result = swept
    best = json.load(open(os.path.join(pretrained_run, "best.json")))
    model = AutoModelForSequenceClassification.from_pretrained(result.best_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.best_dir)
    # At the winner's max_len; every trial reads the sweep's own labelled data (a rerun's seed changes its training
    # only, and the built-in examples and split depend on run.seed).
    data_config = {k: v for k, v in best["config"].items() if k != "run.seed"}
    val = load_labelled(trial_config(cfg.to_dict(), data_config), tokenizer).val
    with torch.no_grad():
        logits = model(input_ids=val["input_ids"], attention_mask=val["attention_mask"]).logits
    accuracy = (logits.argmax(-1) == val["labels"]).float().mean().item()
    assert accuracy == pytest.approx(best["value"], abs=1e-6)
    sides = best["sides"]
    assert (best["side"] == max(sides, key=lambda side: sides[side]["best"])
            and best["value"] == sides[best["side"]]["best"])
    for side in ("pretrained", "scratch"):  # the winner of each side again with a new seed, and at half the labels
        assert len(sides[side]["seeds"]) == 1 and set(sides[side]["label_fractions"]) == {"0.5", "1.0"}
        # the verdict counts the rerun alone; the side's model is the better of the search trial and its rerun
        assert sides[side]["seed_mean"] == sides[side]["seeds"][0]
        assert sides[side]["best"] == max(sides[side]["seeds"][0], sides[side]["search_best"])
    assert "rerun with 1 new seed;" in best["verdict"]
    assert best["verdict"].startswith("Pretraining") and "pretraining_gain" in best
    # Finetuned from pretraining's step-20 snapshot too: accuracy against pretraining tokens.
    assert [p["step"] for p in best["pretrained_steps"]] == [20, 40]
    assert best["pretrained_steps"][0]["tokens"] == 20 * 32 * 64
    assert best["steps_verdict"].startswith("Pretraining past step 20 ")
    snapshot = load_file(os.path.join(pretrained_run, "snapshots", "step-20", "export", "model.safetensors"))
    final = load_file(os.path.join(pretrained_run, "export", "model.safetensors"))
    assert snapshot.keys() == final.keys() and any(not torch.equal(snapshot[k], final[k]) for k in final)


def test_a_trials_configuration_rerun_with_ptray_finetune_reproduces_it(swept, pretrained_run):
    """What a user does with a leaderboard row: `ptray finetune` with its keys trains on the same batches and gives the
    same metrics, value for value (the trial read its data variant from the sweep's object store, the rerun tokenizes
    anew). The row is one at max_len 4, not the base config's data; a stopped trial is compared up to its stop."""
    cfg, result = swept
    row = next(r for r in csv.DictReader(open(result.leaderboard)) if r["finetune.max_len"] == "4")
    search = "search" if row["side"] == "pretrained" else "search-scratch"
    params = json.load(open(glob.glob(os.path.join(pretrained_run, "sweep", search, f"trial_{row['trial_id']}_*",
                                                   "params.json"))[0]))
    rerun = finetune(trial_config(cfg.to_dict(), {"finetune.init": row["side"], **params}))

    def logged(path):
        return [{k: m[k] for k in ("step", "loss", "val_accuracy", "data_fingerprint") if k in m}
                for m in read_metrics(path) if ("loss" in m or "val_accuracy" in m) and m["step"] <= int(row["steps"])]
    trial = logged(os.path.join(pretrained_run, "sweep", "trials", row["trial_id"]))
    assert len(trial) > 2 and logged(rerun["train_dir"]) == trial


def test_resuming_a_sweep_with_a_changed_config_is_refused(swept, pretrained_run):
    cfg, _ = swept
    changed = tiny_config(pretrained_run, *FINETUNE_FAST, "sweep.num_samples=5")
    with pytest.raises(ConfigError, match="differs from the one the sweep"):
        sweep(changed, resume=True)


def test_report_renders_plots(swept, pretrained_run):
    path = report(str(pretrained_run))
    text = open(path).read()
    for name in ("pretrain_loss.png", "pretrain_lr_throughput.png", "sweep_trials.png", "pretrained_vs_scratch.png",
                 "pretraining_steps.png"):
        png = os.path.join(pretrained_run, "report", name)
        assert os.path.getsize(png) > 5000 and open(png, "rb").read(4) == b"\x89PNG"
        assert f"report/{name}" in text
    assert "| rank | trial_id |" in text
    assert "With 50% of the labels, pretraining" in text  # the label curve's own plain sentence
    assert json.load(open(os.path.join(pretrained_run, "best.json")))["steps_verdict"] in text
    assert "## Data" in text and "documents" in text and "duplicates: exact" in text
    assert "Inputs cut short" not in text  # tiny's max_len (128) fits the built-in task
    best_json = os.path.join(pretrained_run, "best.json")
    original = open(best_json).read()
    try:  # what the sweep writes when finetune.max_len cuts the examples (see test_a_max_len_that_cuts...)
        with open(best_json, "w") as f:
            json.dump({**json.loads(original), "cut_note": "12 of 40 training examples (30%) are longer"}, f)
        assert "**Inputs cut short:** 12 of 40 training examples (30%)" in open(report(str(pretrained_run))).read()
    finally:
        with open(best_json, "w") as f:
            f.write(original)


def test_resuming_with_changed_followups_keeps_the_search(swept, pretrained_run, capfd):
    """Follow-up keys alone may change on --resume: the search's trials are not run again, the follow-ups are redone.
    (Runs after the tests that read the swept fixture's follow-ups.)"""
    cfg, result = swept
    sweep_dir = os.path.join(pretrained_run, "sweep")
    leaderboard = open(result.leaderboard).read()
    search_ids = {r["trial_id"] for r in csv.DictReader(open(result.leaderboard))}
    followup_ids = set(os.listdir(os.path.join(sweep_dir, "trials"))) - search_ids
    assert followup_ids
    before = {t: open(os.path.join(sweep_dir, "trials", t, "metrics.jsonl")).read() for t in search_ids}
    changed = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, num_seeds=0, label_fractions=[1.0],
                                                                 pretrained_steps=[]))
    best = sweep(changed, resume=True).best
    assert "the search's trials are kept" in capfd.readouterr().out
    assert set(os.listdir(os.path.join(sweep_dir, "trials"))) == search_ids  # the old follow-ups are gone
    assert not os.path.exists(os.path.join(sweep_dir, "followup"))  # nothing left to follow up
    for t in search_ids:
        assert open(os.path.join(sweep_dir, "trials", t, "metrics.jsonl")).read() == before[t]
    assert open(result.leaderboard).read() == leaderboard
    for side in ("pretrained", "scratch"):
        assert len(best["sides"][side]["seeds"]) == 1 and set(best["sides"][side]["label_fractions"]) == {"1.0"}
    assert "pretrained_steps" not in best or not best["pretrained_steps"]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(pretrained_run, tmp_path):
    """Ctrl-C a running `ptray sweep` after its first trial finished, then `--resume` it."""
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [f"run.dir={run_dir}", f"finetune.pretrained={pretrained_run}/export", *FINETUNE_FAST,
            "cluster.num_workers=1",  # each trial's start is mostly process start-up on 2 cores
            "sweep.searcher=grid", "sweep.space={finetune.lr: {grid: [1e-3, 3e-3]}}",  # a real grid sweep: 2 points
            "sweep.num_samples=1", "sweep.max_concurrent=1", "sweep.compare_scratch=false",
            "sweep.num_seeds=0", "sweep.label_fractions=[1.0]", "sweep.pretrained_steps=[]"]  # ASHA, as by default
    trials = run_dir / "sweep" / "trials"
    cfg = load_config("tiny", args + ["data.builtin_docs=4000"])
    tokenizer = load_tokenizer(os.path.join(pretrained_run, "export"))
    labelled = load_labelled(cfg, tokenizer)
    planned = finetune_schedule(cfg, len(labelled.train["labels"]), len(labelled.val["labels"])).max_steps

    def finished_trials():  # a trial that has evaluated its last step
        done = []
        for trial in (trials.glob("*") if trials.exists() else []):
            if any(r.get("step") == planned and "val_accuracy" in r for r in read_metrics(str(trial))):
                done.append(trial.name)
        return done

    proc = subprocess.Popen([sys.executable, "-m", "ptray.cli", "sweep", "--config", "tiny", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    # One trial at a time: once a second trial has started, Tune has recorded the first as finished.
    while not (finished_trials() and len(list(trials.glob("*"))) >= 2) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(1)
    first = finished_trials()
    assert first, "no trial finished before the deadline"
    before = {t: (trials / t / "metrics.jsonl").read_text() for t in first}
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: Tune saves its state and stops
    proc.wait(timeout=120)
    assert not (run_dir / "best.json").exists()  # it really was interrupted

    result = sweep(cfg, resume=True)
    rows = list(csv.DictReader(open(result.leaderboard)))
    assert len(rows) == 2 and len(list(trials.glob("*"))) == 2
    assert sorted(float(r["finetune.lr"]) for r in rows) == [1e-3, 3e-3]  # the grid's two points, each once
    for t in first:  # finished trials were not run again
        assert (trials / t / "metrics.jsonl").read_text() == before[t]
    # The first trial (the configured point) always runs to its end; the second's ASHA decision was made after the
    # resume, by a scheduler Tune restored empty and ptray refilled from the first trial's log.
    assert [r["status"] for r in sorted(rows, key=lambda r: r["trial_id"])][0] == "finished"
    assert all(r["status"] in ("finished", "stopped early") and int(r["evaluations"]) > 0 for r in rows)


def test_a_killed_finetune_resumes_from_its_last_checkpoint(pretrained_run, tmp_path, capfd):
    """`ptray finetune` SIGKILLed mid-run (process group: driver and its Ray), then the same command again."""
    import signal
    import subprocess
    import sys
    import time

    args = [f"run.dir={tmp_path}", f"finetune.pretrained={pretrained_run}/export", "data.builtin_docs=4000",
            "finetune.builtin_examples=400", "finetune.epochs=2", "finetune.eval_every=5"]
    out = tmp_path / "finetune-classification"
    cfg = load_config("tiny", args)
    labelled = load_labelled(cfg, load_tokenizer(f"{pretrained_run}/export"))
    planned = finetune_schedule(cfg, len(labelled.train["labels"]), len(labelled.val["labels"])).max_steps

    def evaluated_steps():
        return [r["step"] for path in out.glob("train-*") for r in read_metrics(str(path)) if "val_accuracy" in r]

    proc = subprocess.Popen([sys.executable, "-m", "ptray.cli", "finetune", "--config", "tiny", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while max(evaluated_steps(), default=0) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = max(evaluated_steps(), default=0)
    assert 10 <= killed_at < planned, (killed_at, planned)  # killed mid-run, with checkpoints behind it
    capfd.readouterr()

    result = finetune(cfg)
    assert "resumed from" in capfd.readouterr().out
    steps = [r["step"] for r in read_metrics(result["train_dir"]) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == planned  # one history: nothing logged twice, run to its end
    assert (out / "export" / "model.safetensors").exists()


def test_sft_sweep_picks_the_lowest_response_loss_and_exports_a_causal_lm(pretrained_run, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, f"finetune.pretrained={pretrained_run}/export", "finetune.task=sft",
                      "finetune.max_len=24", *FINETUNE_FAST, "cluster.num_workers=1", "sweep.metric=val_loss",
                      "sweep.mode=min", "sweep.searcher=grid", "sweep.space={finetune.lr: {grid: [1e-4, 3e-3]}}",
                      "sweep.num_samples=1", "sweep.scheduler=none", "sweep.compare_scratch=false",
                      "sweep.num_seeds=0", "sweep.label_fractions=[1.0]")
    result = sweep(cfg)
    rows = list(csv.DictReader(open(result.leaderboard)))
    assert sorted(float(r["finetune.lr"]) for r in rows) == [1e-4, 3e-3]
    assert result.best["value"] == min(float(r["best_metric"]) for r in rows)  # val_loss: lower is better
    assert AutoModelForCausalLM.from_pretrained(result.best_dir).config.model_type == "gpt2"
    console = "".join(capfd.readouterr())
    assert "[sweep] best val_loss" in console
    # Tune's experiment header and Ray Train's placement-group watchdog need --verbose.
    assert not [s for s in ("Configuration for experiment", "View detailed results", "Cleaning up placement group")
                if s in console], console[-3000:]
