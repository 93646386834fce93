"""Config loading, overrides and validation: pure functions, no Ray."""

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from ptray.config import Config, builtin_config_names, check_space_values, load_config, resolved
from ptray.errors import ConfigError
from ptray.schedule import pretrain_schedule


@pytest.mark.parametrize("name", builtin_config_names())
def test_every_shipped_config_loads_and_validates(name):
    cfg = load_config(name)
    assert pretrain_schedule(cfg).grad_accum_steps >= 1
    assert cfg.data.seq_len <= cfg.model.max_positions


def test_builtin_configs_include_the_promised_ones():
    assert {"tiny", "gpt2-124m", "llama-1b"} <= set(builtin_config_names())


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("tiny", ["pretrain.max_steps=7", "data.train_files=[a.txt,b/*.jsonl]", "pretrain.lr=1e-4",
                               "deepspeed.zero_stage=3", "cluster.use_gpu=false"])
    assert cfg.pretrain.max_steps == 7
    assert cfg.data.train_files == ["a.txt", "b/*.jsonl"]
    assert cfg.pretrain.lr == pytest.approx(1e-4)
    assert cfg.deepspeed.zero_stage == 3


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"'pretrain.max_step'.*'pretrain.max_steps'"):
        load_config("tiny", ["pretrain.max_step=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'pretrian'.*'pretrain'"):
        load_config("tiny", ["pretrian.max_steps=5"])


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage=4 is not valid"),
    ("pretrain.max_steps=ten", "pretrain.max_steps must be an integer"),
    ("pretrain.global_batch_size=30", "not divisible by cluster.num_workers x pretrain.micro_batch_size"),
    ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_positions"),
    ("model.family=bart", "model.family='bart' is not valid"),
    ("pretrain.objective=mlm", "does not fit model.family"),
    ("deepspeed.offload_params=true", "offload_params needs deepspeed.zero_stage=3"),
    ("cluster.use_gpu=maybe", "cluster.use_gpu must be true or false"),
    ("deepspeed.torch_adam=false", "on CPU workers (cluster.use_gpu=false) set deepspeed.torch_adam=true"),
])
def test_invalid_values_raise_actionable_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_missing_config_suggests_builtin_name():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")


def test_config_show_round_trips(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ptray.cli", "config", "show", "tiny", "pretrain.max_steps=9"],
                         capture_output=True, text=True, check=True).stdout
    saved = tmp_path / "my.yaml"
    saved.write_text(out)
    again = load_config(str(saved))
    assert again.pretrain.max_steps == 9
    assert again == resolved(load_config("tiny", ["pretrain.max_steps=9"]))
    assert yaml.safe_load(out)["run"]["dir"] == "runs/tiny"


def test_cli_bad_key_exits_nonzero_with_message():
    proc = subprocess.run([sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", "model.hiden_size=8"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.hidden_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("space, message", [
    ("{}", "sweep.space is empty"),
    ("{finetune.lrr: {loguniform: [1e-4, 1e-2]}}", "did you mean 'finetune.lr'"),
    ("{finetune.lr: {normal: [0, 1]}}", "must be one of"),
    ("{finetune.lr: {loguniform: [0, 1]}}", "0 < low < high"),
    ("{finetune.lr: {choice: []}}", "non-empty list"),
    ("{model.hidden_size: {choice: [64, 128]}}", "not something a finetuning trial can change"),
    ("{finetune.val_fraction: {choice: [0.1, 0.2]}}", "not something a finetuning trial can change"),
    ("{finetune.task: {choice: [sft]}}", "not something a finetuning trial can change"),
    ("{finetune.train_fraction: {uniform: [0.1, 1.0]}}", "changes the data a trial trains on"),
])
def test_sweep_space_errors(space, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"sweep.space={space}"])


@pytest.mark.parametrize("space, message", [  # a value a trial could draw but not use
    ("{finetune.layer_decay: {uniform: [0.6, 1.2]}}", r"gives finetune.layer_decay=1.2.*must be in \(0, 1\]"),
    ("{finetune.lr: {choice: [0, 1e-3]}}", r"finetune.lr=0.*must be > 0"),
    ("{finetune.pooling: {grid: [mean, max]}}", r"finetune.pooling='max'.*choose one of"),
])
def test_a_space_value_no_trial_can_run_is_named(space, message):
    cfg = load_config("tiny", [f"sweep.space={space}"])  # it loads: `ptray finetune` does not sweep
    with pytest.raises(ConfigError, match=message):
        check_space_values(cfg)
    check_space_values(load_config("tiny"))


def test_search_space_and_searchers_map_to_tune():
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from ptray.sweep import search_space, searcher

    cfg = load_config("tiny", ["sweep.space={finetune.lr: {loguniform: [1e-4, 1e-2]}, finetune.epochs: {grid: [1, 2]},"
                               " finetune.freeze_layers: {randint: [0, 2]}}"])
    space = search_space(cfg)
    assert space["finetune.epochs"] == {"grid_search": [1, 2]}
    assert 1e-4 <= space["finetune.lr"].sample() <= 1e-2
    assert {space["finetune.freeze_layers"].sample() for _ in range(200)} == {0, 1, 2}  # inclusive bounds
    assert isinstance(searcher(cfg, 2), BasicVariantGenerator)
    optuna_cfg = load_config("tiny", ["sweep.searcher=optuna"])
    from ptray.sweep import configured_point

    first = configured_point(load_config("tiny", ["finetune.lr=5e-4"]))  # the untuned run is the first trial
    assert first == {"finetune.lr": 5e-4, "finetune.lm_weight": 0.0}
    assert searcher(load_config("tiny", ["finetune.lr=5e-4"]), 2)._points_to_evaluate == [first]
    assert configured_point(load_config("tiny", ["finetune.lr=1e-5"])) is None  # outside the space: not forced in
    assert configured_point(cfg) is None  # a grid space enumerates its points anyway
    limited = searcher(optuna_cfg, 3)
    assert isinstance(limited, ConcurrencyLimiter) and limited.max_concurrent == 3
    assert type(limited.searcher).__name__ == "OptunaSearch"


@pytest.mark.parametrize("override, message", [
    ("run.seed=-1", "run.seed must be >= 0, got -1"), ("pretrain.lr=0", "pretrain.lr must be > 0"),
    ("finetune.lr=-1e-3", "finetune.lr must be > 0"),
    ("finetune.warmup_ratio=1", r"finetune.warmup_ratio must be in \[0, 1\)"),
    ("sweep.num_samples=0", "sweep.num_samples must be > 0"), ("pretrain.beta2=1.0", "pretrain.beta2 must be in"),
    ("cluster.max_failures=-2", "cluster.max_failures must be >= -1"), ("model.dropout=1", "model.dropout must be in"),
    ("pretrain.warmup_steps=-5", "pretrain.warmup_steps must be >= 0"), ("data.min_chars=-1", "data.min_chars"),
    ("finetune.val_fraction=0", r"finetune.val_fraction must be in \(0, 1\)"),
    ("sweep.label_fractions=[0.1,1.5]", "sweep.label_fractions holds 1.5"),
    ("sweep.label_fractions=[0]", "sweep.label_fractions holds 0"),
    ("sweep.num_seeds=-1", "sweep.num_seeds must be >= 0"),
    ("sweep.grace_period=-1", "sweep.grace_period must be >= 0"),
    ("sweep.pretrained_steps=[0]", "sweep.pretrained_steps holds 0"),
    ("sweep.pretrained_steps=[2.5]", r"sweep.pretrained_steps holds 2.5; give optimizer steps .* or fractions"),
])
def test_sweep_option_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


@pytest.mark.parametrize("overrides, message", [
    (["data.dedup=fuzzy"], "data.dedup='fuzzy' is not valid; choose one of exact, minhash, none"),
    (["data.dedup=minhash", "data.ingest=ray_data"], "data.dedup=minhash needs data.ingest=shards"),
    (["data.minhash_threshold=0"], r"data.minhash_threshold must be in \(0, 1\]"),
    (["data.minhash_shingle=0"], "data.minhash_shingle must be > 0"),
    (["run.loggers=[tensorboard,neptune]"], "run.loggers has 'neptune', which is not a tracker ptray knows"),
])
def test_dedup_and_tracker_option_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_an_older_config_s_boolean_dedup_reads_as_exact_or_none():
    assert load_config("tiny", ["data.dedup=true"]).data.dedup == "exact"
    assert load_config("tiny", ["data.dedup=false"]).data.dedup == "none"


def test_pretrained_steps_must_fall_inside_pretraining_before_a_pipeline_starts(tmp_path):
    from ptray.pipeline import pipeline

    shortened = load_config("tiny", [f"run.dir={tmp_path}", "pretrain.max_steps=150",  # a pretrain alone may do this
                                     "sweep.pretrained_steps=[100,200]"])
    with pytest.raises(ConfigError, match=r"sweep.pretrained_steps holds 200, but pretraining runs steps 1-150"):
        pipeline(shortened)  # before any work: nothing prepared, no Ray needed
    assert not os.listdir(tmp_path)


def test_pretrained_steps_as_fractions_follow_max_steps(tmp_path):
    from ptray.config import check_pretrained_steps, snapshot_steps
    from ptray.sweep import snapshot_export

    def steps(*overrides):
        cfg = load_config("tiny", list(overrides))
        check_pretrained_steps(cfg)  # a fraction always falls inside pretraining
        return snapshot_steps(cfg)

    assert steps() == [100, 200]  # tiny's thirds of its 300 steps
    assert steps("pretrain.max_steps=1500") == [500, 1000]  # not 100 and 200 of 1,500
    assert steps("pretrain.max_steps=150") == [50, 100]  # a shortened tiny pipeline needs no other change
    assert steps("pretrain.max_steps=2") == [1]  # both thirds round into the run, once
    assert steps("sweep.pretrained_steps=[0.5,300,50]", "pretrain.max_steps=600") == [50, 300]
    # a sweep whose max_steps differs from pretraining's looks for other steps, and says why
    with pytest.raises(ConfigError, match=r"names step 500, .* fractions count in pretrain.max_steps=1500"):
        snapshot_export(load_config("tiny", [f"run.dir={tmp_path}", "pretrain.max_steps=1500"]), 500)


def test_asha_grace_is_a_quarter_of_the_longest_trial_never_inside_warmup():
    from ptray.sweep import grace_steps

    cfg = load_config("tiny")
    assert grace_steps(cfg, 100, 10) == 25  # the default: a quarter of the longest trial
    assert grace_steps(cfg, 100, 40) == 40  # not while the longest warm-up is still running
    assert grace_steps(load_config("tiny", ["sweep.grace_period=30"]), 100, 10) == 30
    with pytest.raises(ConfigError, match="sweep.grace_period=100 optimizer steps is not shorter than the longest"):
        grace_steps(load_config("tiny", ["sweep.grace_period=100"]), 100, 10)


def test_every_numeric_key_has_a_checked_range():
    from ptray.config import CHOICES, RANGES

    numeric = {f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
               for f in dataclasses.fields(section.default_factory) if f.type in ("int", "float")}
    unchecked = numeric - set(RANGES) - set(CHOICES) - {"finetune.dropout"}  # (-1: keep the model's; checked apart)
    assert not unchecked, f"add these to config.RANGES: {sorted(unchecked)}"
