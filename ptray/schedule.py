"""One stage's optimization, whichever stage it is: what `loop.fit` and `engine` read, and nothing else.

Pretraining builds its `Schedule` from the `pretrain` section (`pretrain_schedule`), finetuning from the `finetune`
section and the size of the labelled set (`trial.finetune_schedule`). Every derived number (accumulation steps,
warm-up steps, steps per epoch) is computed once, here, when a schedule is built; workers receive the built schedule.
"""

from __future__ import annotations

import dataclasses
import math

from ptray.config import Config


@dataclasses.dataclass(frozen=True)
class Schedule:
    max_steps: int
    global_batch_size: int  # sequences (or examples) per optimizer step over all workers
    micro_batch_size: int  # per worker per forward pass
    grad_accum_steps: int  # global = workers x micro x accumulation
    lr: float  # peak learning rate
    warmup_steps: int  # linear warm-up from lr / warmup_steps
    decay: str  # after warm-up: cosine to min_lr, wsd (stable, then linear decay over decay_fraction), or constant
    min_lr_ratio: float
    decay_fraction: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float  # max global gradient norm; 0: off
    log_every: int
    eval_every: int  # 0: only at the end
    ckpt_every: int
    max_nonfinite_steps: int
    profile_steps: int = 0
    peak_flops_per_worker: float = 0.0  # for MFU; 0: looked up or measured
    steps_per_epoch: int = 0  # finetuning: optimizer steps per pass over the labelled set; 0: not counted in epochs

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.lr * self.min_lr_ratio
        if self.decay == "constant":
            return self.lr
        if self.decay == "wsd":
            decay_start = int(self.max_steps * (1 - self.decay_fraction))
            if step < decay_start:
                return self.lr
            return self.lr + (min_lr - self.lr) * (step - decay_start) / max(1, self.max_steps - decay_start)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * progress))


def pretrain_schedule(cfg: Config) -> Schedule:
    """Pretraining's schedule: the `pretrain` section as it is."""
    p = cfg.pretrain
    warmup_steps = p.warmup_steps or round(p.warmup_ratio * p.max_steps)  # a ratio follows a max_steps override
    return Schedule(
        max_steps=p.max_steps, global_batch_size=p.global_batch_size, micro_batch_size=p.micro_batch_size,
        grad_accum_steps=p.global_batch_size // (cfg.cluster.num_workers * p.micro_batch_size),  # validated
        lr=p.lr, warmup_steps=warmup_steps, decay=p.schedule, min_lr_ratio=p.min_lr_ratio,
        decay_fraction=p.decay_fraction, weight_decay=p.weight_decay, beta1=p.beta1, beta2=p.beta2,
        grad_clip=p.grad_clip, log_every=p.log_every, eval_every=p.eval_every, ckpt_every=p.ckpt_every,
        max_nonfinite_steps=p.max_nonfinite_steps, profile_steps=p.profile_steps,
        peak_flops_per_worker=p.peak_flops_per_worker)
