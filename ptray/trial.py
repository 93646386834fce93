"""A finetune run's TorchTrainer, and the function each sweep trial runs: the driver side of finetuning.

Light on purpose. Every Tune trial is a process of its own, which unpickles `make_trial`'s function and so imports
this module: torch, Ray Train and Tune, but not transformers, DeepSpeed or the training loop, which only the Train
workers use (`ptray.finetune`). Importing all of `ptray.sweep` instead cost every trial about 4 s of its start on
2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING

import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ptray.config import DATA_KEYS, Config, trial_config
from ptray.schedule import Schedule
from ptray.session import fit_with_retries, train_logging, worker_scaling

if TYPE_CHECKING:
    from ptray.sweep import LabelledSets


def pretrained_dir(cfg: Config) -> str:
    """Absolute: Ray workers do not run in the driver's working directory."""
    return os.path.abspath(cfg.finetune.pretrained or os.path.join(cfg.run_dir, "export"))


def finetune_schedule(cfg: Config, num_train_examples: int, num_val_examples: int) -> Schedule:
    """Finetuning's schedule: `finetune.epochs` passes over `num_train_examples` in global batches of
    `finetune.global_batch_size` (an epoch's last one may be partial), linear warm-up over `finetune.warmup_ratio` of
    the steps, then cosine decay to 0; an evaluation, reported with a checkpoint, every `eval_interval` steps.
    Adam's betas, gradient clipping, the logging interval and the non-finite-loss rule are `pretrain`'s."""
    ft, p = cfg.finetune, cfg.pretrain
    steps_per_epoch = max(1, math.ceil(num_train_examples / ft.global_batch_size))
    max_steps = ft.epochs * steps_per_epoch
    eval_every = eval_interval(cfg, max_steps, num_val_examples)
    return Schedule(
        max_steps=max_steps, global_batch_size=ft.global_batch_size, micro_batch_size=ft.micro_batch_size,
        grad_accum_steps=ft.global_batch_size // (cfg.cluster.num_workers * ft.micro_batch_size),  # validated
        lr=ft.lr, warmup_steps=max(1, int(ft.warmup_ratio * max_steps)), decay="cosine", min_lr_ratio=0.0,
        decay_fraction=0.0, weight_decay=ft.weight_decay, beta1=p.beta1, beta2=p.beta2, grad_clip=p.grad_clip,
        log_every=max(1, min(p.log_every, eval_every)), eval_every=eval_every, ckpt_every=eval_every,
        max_nonfinite_steps=p.max_nonfinite_steps, peak_flops_per_worker=p.peak_flops_per_worker,
        steps_per_epoch=steps_per_epoch)


def eval_interval(cfg: Config, max_steps: int, num_val_examples: int) -> int:
    """`finetune.eval_every`, or with 0 the automatic interval: as many training examples as the validation set holds
    between two evaluations, and at least 8 evaluations in a run (ASHA's rungs and the best checkpoint need a few).
    Evaluating is a forward pass per validation example, about a third of a training example's cost, so it then takes
    about a quarter of a run. A fixed interval does not scale: every 5 steps of 16 examples against 750 validation
    examples, an epoch took 177 s; at this interval 80 s. Counted per run, not per epoch: label-fraction runs have
    many short epochs."""
    if cfg.finetune.eval_every:
        return cfg.finetune.eval_every
    return max(1, min(math.ceil(num_val_examples / cfg.finetune.global_batch_size), math.ceil(max_steps / 8)))


def train_loop_per_worker(loop_config: dict) -> None:
    """The workers' loop, `ptray.finetune`'s: imported there, in the workers, and not in a trial's process."""
    from ptray import finetune

    finetune.train_loop_per_worker(loop_config)


def build_trainer(cfg: Config, data_ref: ray.ObjectRef, *, storage_path: str, name: str, num_examples: int,
                  num_val: int, callbacks=(), metric: str | None = None, mode: str = "max",
                  tracker_stage: str = "finetune", tracker_parent: dict | None = None) -> TorchTrainer:
    """The TorchTrainer of one finetune run (also each sweep trial's; see `fit` for the tracker arguments)."""
    run_dir = os.path.join(storage_path, name)
    os.makedirs(run_dir, exist_ok=True)
    keep = CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode) \
        if metric else CheckpointConfig(num_to_keep=1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data": data_ref, "run_dir": run_dir,
                           "pretrained": pretrained_dir(cfg),
                           "schedule": dataclasses.asdict(finetune_schedule(cfg, num_examples, num_val)),
                           "keep_best": (metric, mode) if metric else None,
                           "tracker_stage": tracker_stage, "tracker_parent": tracker_parent},
        scaling_config=worker_scaling(cfg),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                             logging_config=train_logging(),
                             failure_config=FailureConfig(max_failures=0),  # retries: session.fit_with_retries
                             checkpoint_config=keep),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
    )


def data_key(cfg: Config) -> str:
    """Which tokenized labelled set a configuration trains on: the values of the keys that change the data."""
    return json.dumps({key: getattr(cfg.finetune, key.split(".")[1]) for key in DATA_KEYS}, sort_keys=True)


def make_trial(base: dict, sets: LabelledSets, trials_dir: str, metric: str, mode: str,
               plans: list[dict] | None = None, tracker_parent: dict | None = None):
    """Tune's function for one trial: a TorchTrainer over the trial's configuration. `plans`: a fixed list of
    configurations, picked by the trial's `plan` index (follow-up runs), instead of sampled overrides.
    `tracker_parent`: the sweep's experiment-tracker ids; each trial logs as their child."""
    # Only these travel with the trial (`sets` itself holds the tokenizer and a tokenized copy: a 10 MiB actor).
    refs, num_train, num_val = sets.refs, sets.num_train, sets.num_val

    def trial(params: dict) -> None:
        overrides = plans[params["plan"]] if plans is not None else params
        cfg = trial_config(base, overrides)
        key, trial_id = data_key(cfg), tune.get_context().get_trial_id()
        fit_with_retries(lambda: build_trainer(cfg, refs[key], storage_path=trials_dir, name=trial_id,
                                               num_examples=num_train[key], num_val=num_val,
                                               callbacks=[TuneReportCallback()],
                                               metric=metric, mode=mode, tracker_stage=f"sweep/{trial_id}",
                                               tracker_parent=tracker_parent),
                         max_failures=cfg.cluster.max_failures, label="finetune")
    return trial
