"""The training loop shared by pretraining and finetuning: one loop, read top to bottom.

A stage (pretrain.py, finetune.py) builds its model and a `Task` that knows its data, loss and evaluation; `fit` does
the rest: learning-rate schedule, forward/backward/step with gradient accumulation, logging, evaluation, checkpoints
reported to Ray Train, and resume from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Protocol

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from ptray import checkpoint as ckpt
from ptray import storage
from ptray.config import Config
from ptray.errors import StartupError, TrainingStopped, UserError
from ptray.metrics import MetricsLog, peak_flops_per_worker, progress_line, read_metrics, step_profiler
from ptray.schedule import Schedule
from ptray.session import exit_at_once_if_torn_down, quiet_libraries
from ptray.trackers import Trackers


class Task(Protocol):
    """What a stage plugs into `fit`."""

    def next_batch(self, state: ckpt.TrainerState) -> dict[str, torch.Tensor]:
        """The next micro-batch for this rank, in host memory; advances `state`'s data position. Every rank's
        micro-batches of a step have the same shape (tokens are counted from it)."""

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward pass and mean loss of a micro-batch (already on the engine's device)."""

    def evaluate(self, engine) -> dict[str, float]:
        """Validation metrics, identical on every rank (a collective: every rank calls it). {} when there is none."""

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """Fixed model inputs, the same on every rank; their logits are stored to verify the export."""

    # Optional: `record_position(state)`, called on every rank before a checkpoint is written, stores in `state` a data
    # position that only the ranks together know (streamed data: the rows each has trained).


_first_step_done = False  # this worker process has completed an optimizer step (set by `fit`)


def worker_entry(train_loop):
    """Decorates a stage's `train_loop_per_worker`: an exception raised before the worker's first optimizer step
    becomes a `StartupError`, which the driver never retries (it would only repeat); one raised later (a lost peer, an
    out-of-memory at step 5,000) stays as it is and may be retried (`cluster.max_failures`)."""

    @functools.wraps(train_loop)
    def run(loop_config: dict) -> None:
        global _first_step_done
        _first_step_done = False
        try:
            train_loop(loop_config)
        except Exception as e:
            if _first_step_done:
                raise
            raise StartupError(f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e),
                               traceback.format_exc(), isinstance(e, UserError)) from None
    return run


def started_training() -> None:
    global _first_step_done
    _first_step_done = True


def setup_worker(cfg: Config):
    """Per-worker set-up before any model is built: CPU threads and DeepSpeed's accelerator.
    Returns (rank, world, device)."""
    if not cfg.cluster.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    quiet_libraries()
    exit_at_once_if_torn_down()
    from ptray import engine as ds

    ds.check_device(cfg)
    ds.adopt_process_group(cfg)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def fit(cfg: Config, schedule: Schedule, task: Task, model: torch.nn.Module, *, run_dir: str, checkpoint_root: str,
        flops_per_token: Callable[[int], float], label: str, snapshot_steps: tuple[int, ...] = (),
        keep_best: tuple[str, str] | None = None, bound_to: dict | None = None, tracker_stage: str = "",
        tracker_parent: dict | None = None) -> None:
    """Wrap `model` in DeepSpeed, resume from the newest good checkpoint under `checkpoint_root` if there is one, and
    train `schedule.max_steps` steps.

    At each of `snapshot_steps` the weights are also saved to `<run_dir>/snapshots/step-<N>/` (kept whatever
    `num_to_keep` says): the driver exports them, to finetune from intermediate points of pretraining.

    `schedule` is the stage's optimization (see ptray.schedule); `cfg` gives the cluster, DeepSpeed and model settings.
    `flops_per_token(length)`: training FLOPs per token of a sequence of `length` positions (for MFU). Tokens are the
    sequence positions the model computes, padding included; a step's are this rank's times the world size, since every
    rank's micro-batches have the same shape (a Task contract: finetuning cuts them to its global batch's longest).
    `keep_best=(metric, mode)`: write a checkpoint only when an evaluation improves `metric` (finetuning keeps just the
    best one anyway); every other evaluation is still reported to Ray, without one, so schedulers see it. Each report
    also carries `best_<metric>`, the best evaluation so far.
    `bound_to` is saved with every checkpoint: what it cannot be resumed without (see `pretrain.resume_key`).
    `tracker_stage` names this run in the experiment trackers (default: `label`); `tracker_parent` is a sweep's tracker
    ids when this is one of its trials (see ptray.trackers).
    """
    from ptray import engine as ds  # imports DeepSpeed; after setup_worker set DS_ACCELERATOR

    p = schedule  # read on almost every line below
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    num_params = sum(t.numel() for t in model.parameters())
    check_shared(checkpoint_root, rank, world_size, ray.get_runtime_context().get_node_id())
    engine, state = start_engine(cfg, schedule, model, checkpoint_root, rank, world_size, label)
    cannot_compile = ds.compile_model(engine, cfg)
    if cannot_compile and rank == 0:
        print(f"[{label}] WARNING: {cannot_compile}", flush=True)
    state.bound_to = bound_to or {}
    if state.world_size != world_size:  # finetuning's data position counts per-worker batches, so rescale it
        state.batches_in_epoch = state.batches_in_epoch * state.world_size // world_size
        state.world_size = world_size

    peak_flops, peak_source = peak_flops_per_worker(cfg.cluster.use_gpu, p.peak_flops_per_worker)
    log = None
    if rank == 0:
        trackers = Trackers(cfg, tracker_stage or label, run_dir, tracker_parent) if cfg.run.loggers else None
        log = MetricsLog(run_dir, state.step, trackers)
        if trackers:
            print(f"[{label}] tracking: {trackers.describe()}", flush=True)
    if rank == 0:
        print(f"[{label}] {num_params:,} parameters, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}"
              f"{', compiled' if engine.is_compiled else ''}, "
              f"{world_size} workers x {p.micro_batch_size} x {p.grad_accum_steps} accumulation, {p.max_steps} "
              f"steps ({p.warmup_steps} warm-up); MFU against {peak_flops / 1e9:,.1f} GFLOP/s per worker "
              f"({peak_source})", flush=True)

    def improves(metrics: dict) -> bool:
        """Whether these metrics should be checkpointed (records a new best; the same on every rank)."""
        if keep_best is None:
            return True
        name, mode = keep_best
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            return False
        if state.best_metric is None or (value > state.best_metric if mode == "max" else value < state.best_metric):
            state.best_metric = value
            return True
        return False

    def save_checkpoint(metrics: dict, probe: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            ds.save(engine, checkpoint_dir)
            ckpt.save_rng(checkpoint_dir, rank, node_id=ray.get_runtime_context().get_node_id())
            if hasattr(task, "record_position"):  # streamed data: what every rank has trained (collective)
                task.record_position(state)
            if rank == 0:
                ckpt.write_trainer_state(state, checkpoint_dir)
                with open(os.path.join(checkpoint_dir, ckpt.METRICS), "w") as f:
                    json.dump(metrics, f)
                if probe is not None:
                    torch.save(probe, os.path.join(checkpoint_dir, ckpt.PROBE))
            # The commit marker lists every rank's files: a checkpoint missing any of them is detected on resume.
            digests = [None] * world_size
            dist.all_gather_object(digests, ckpt.file_digests(checkpoint_dir))
            if rank == 0:
                ckpt.write_commit(checkpoint_dir, {k: v for d in digests for k, v in d.items()})
            # A barrier: every rank reports; Ray Train records the checkpoint once all ranks' files are in.
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir))

    window_loss = torch.zeros((), device=engine.device)
    window_fingerprint = 0  # which tokens were trained on (summed over ranks when logged)
    window_steps, window_updates, window_data_wait, window_start = 0, 0, 0.0, time.perf_counter()
    window_tokens, window_flops = 0, 0.0
    window_paused = 0.0  # evaluation and checkpoint time inside the window: not training throughput
    paused_total = {"eval": 0.0, "checkpoint": 0.0}  # over the run, for the closing time breakdown
    # Where training time goes, host-side (on CPU the work itself; on a GPU the time to queue it, unless a phase waits:
    # use pretrain.profile_steps there). Backward includes ZeRO's gradient reduction, which DeepSpeed runs in it.
    phases = dict.fromkeys(("data", "forward", "backward", "step", "logging"), 0.0)
    fit_start = time.perf_counter()

    @contextlib.contextmanager
    def paused(kind: str):
        """Time spent inside is left out of the window's throughput and counted as `kind` in the breakdown."""
        nonlocal window_paused
        start = time.perf_counter()
        yield
        window_paused += time.perf_counter() - start
        paused_total[kind] += time.perf_counter() - start

    profiler = step_profiler(run_dir, state.step, p.profile_steps, engine.device.type == "cuda") if rank == 0 else None
    nonfinite_in_a_row = 0
    injected_nonfinite = steps_from_env("PTRAY_INJECT_NONFINITE_STEPS")  # a fault drill; empty in normal runs
    metrics: dict = {}
    engine.train()
    while state.step < p.max_steps:
        lr = p.lr_at(state.step)
        ds.set_lr(engine, lr)
        step_loss = torch.zeros((), device=engine.device)
        step_tokens = 0
        for micro_step in range(p.grad_accum_steps):
            wait_start = time.perf_counter()
            batch = task.next_batch(state)
            window_fingerprint += fingerprint(batch["input_ids"])
            positions = batch["input_ids"].numel() * world_size  # over all ranks: they have the same shapes
            step_tokens += positions
            window_flops += positions * flops_per_token(batch["input_ids"].shape[1])
            batch = to_device(batch, engine.device)
            forward_start = time.perf_counter()
            window_data_wait += forward_start - wait_start
            loss = task.loss(engine, batch)
            if rank == 0 and state.step + 1 in injected_nonfinite and micro_step == p.grad_accum_steps - 1:
                loss = loss * float("nan")
            backward_start = time.perf_counter()
            engine.backward(loss)
            step_loss += loss.detach() / p.grad_accum_steps
            if micro_step < p.grad_accum_steps - 1:
                engine.step()  # counts the micro-batch; DeepSpeed updates only on the accumulation boundary
            phases["data"] += forward_start - wait_start
            phases["forward"] += backward_start - forward_start
            phases["backward"] += time.perf_counter() - backward_start
        step_start = time.perf_counter()
        # All ranks must agree whether to update: one scalar all-reduce (DeepSpeed syncs on the grad norm anyway).
        finite = torch.isfinite(step_loss).float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        update = bool(finite.item())
        ds.step(engine, apply_update=update)  # a non-finite loss skips the update; the batch is consumed all the same
        phases["step"] += time.perf_counter() - step_start
        started_training()  # from here on a failure may be transient: the driver may retry it
        state.step += 1
        state.tokens += step_tokens
        window_tokens += step_tokens
        if profiler:
            profiler.step()
        window_steps += 1
        if update:
            nonfinite_in_a_row = 0
            window_loss += step_loss
            window_updates += 1
        else:
            nonfinite_in_a_row += 1
            state.skipped_steps += 1
            if rank == 0:
                print(f"[{label}] WARNING: step {state.step}: non-finite loss on at least one worker; update skipped "
                      f"({nonfinite_in_a_row} in a row, {state.skipped_steps} in total)", flush=True)

        if state.step % p.log_every == 0 or state.step == p.max_steps or nonfinite_in_a_row >= p.max_nonfinite_steps:
            logging_start = time.perf_counter()
            dist.all_reduce(window_loss)  # a sync point: the mean loss over ranks and the updated steps of this window
            fingerprint_sum = torch.tensor(window_fingerprint, dtype=torch.int64, device=engine.device)
            dist.all_reduce(fingerprint_sum)
            elapsed = time.perf_counter() - window_start - window_paused
            tokens_per_s = window_tokens / elapsed
            mean_loss = window_loss.item() / (world_size * window_updates) if window_updates else float("nan")
            metrics = {"step": state.step, "loss": mean_loss, "lr": lr,
                       "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                       "mfu": window_flops / elapsed / (peak_flops * world_size),
                       "data_wait_s": window_data_wait / window_steps, "grad_norm": ds.grad_norm(engine),
                       "epoch": state.epoch, "skipped_steps": state.skipped_steps,
                       "data_fingerprint": int(fingerprint_sum.item())}
            if hasattr(task, "position_metrics"):  # e.g. tokens per source of a data mixture
                metrics.update(task.position_metrics(state))
            if engine.device.type == "cuda":  # rank 0's high-water mark: how close the run is to running out
                metrics["max_memory_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
            if log:
                log.write(metrics)
                print(progress_line(metrics, p.max_steps), flush=True)
            window_loss.zero_()
            window_fingerprint = 0
            window_steps, window_updates, window_data_wait, window_start = 0, 0, 0.0, time.perf_counter()
            window_tokens, window_flops, window_paused = 0, 0.0, 0.0
            phases["logging"] += window_start - logging_start

        if nonfinite_in_a_row >= p.max_nonfinite_steps:
            # Stop without a checkpoint: the newest one is from before these steps. Returning (rather than raising)
            # keeps Ray Train from retrying a run that would only diverge again; the driver raises TrainingStopped.
            reason = (f"the loss was not finite in {nonfinite_in_a_row} optimizer steps in a row (steps "
                      f"{state.step - nonfinite_in_a_row + 1}-{state.step}; pretrain.max_nonfinite_steps="
                      f"{p.max_nonfinite_steps}); each update was skipped, then training stopped")
            if log:
                log.write({"step": state.step, "tokens": state.tokens, "stopped": reason})
                log.close(finished=False)
                print(f"[{label}] {reason}", flush=True)
            return

        if (p.eval_every and state.step % p.eval_every == 0) or state.step == p.max_steps:
            with paused("eval"):
                engine.eval()
                with torch.no_grad():
                    val_metrics = task.evaluate(engine)
                engine.train()
                if val_metrics:
                    metrics = {**metrics, **val_metrics, "step": state.step, "tokens": state.tokens}
                    if log:
                        log.write({"step": state.step, "tokens": state.tokens, **val_metrics})
                        print(f"step {state.step:>6}/{p.max_steps} | " +
                              " | ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()), flush=True)

        with paused("checkpoint"):
            if state.step in snapshot_steps:
                ds.save(engine, snapshot_dir(run_dir, state.step))  # collective; every rank writes its shards
            at_end = state.step == p.max_steps
            if at_end or (state.step % p.ckpt_every == 0 and nonfinite_in_a_row == 0):  # never mid-streak
                better = improves(metrics)
                if keep_best is not None and state.best_metric is not None:
                    # The run's best so far, the figure it is selected by: what a sweep's ASHA ranks trials on.
                    metrics = {**metrics, f"best_{keep_best[0]}": state.best_metric}
                if better:
                    # The probe lets the export be verified; finetuning may export any kept checkpoint.
                    probe = probe_logits(engine, task.probe_inputs()) if at_end or keep_best else None
                    save_checkpoint(metrics, probe=probe)
                else:
                    ray.train.report(metrics)  # no better than the kept checkpoint: the metrics alone

    if profiler:
        profiler.stop()
    if rank == 0:
        total = time.perf_counter() - fit_start
        training = total - sum(paused_total.values())
        print(f"[{label}] {total:.1f} s in the loop: training {training:.1f} s ("
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
              + f"), evaluation {paused_total['eval']:.1f} s, checkpoints {paused_total['checkpoint']:.1f} s",
              flush=True)
        if log:
            breakdown = {"total": total, "training": training, **phases, **paused_total}
            log.write({"step": state.step, "tokens": state.tokens,
                       "time_breakdown_s": {name: round(seconds, 3) for name, seconds in breakdown.items()}})
            log.close()


def snapshot_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "snapshots", f"step-{step}")


def raise_if_stopped(run_dir: str, checkpoint: Checkpoint | None, label: str) -> None:
    """After `trainer.fit()`: raise TrainingStopped if `fit` stopped early (its last metrics row says why)."""
    rows = read_metrics(run_dir)
    if not rows or "stopped" not in rows[-1]:
        return
    if checkpoint is None:
        kept = "no checkpoint had been written yet"
    else:
        step = json.loads(storage.read_text(storage.join(checkpoint.path, ckpt.TRAINER_STATE)))["step"]
        kept = f"the last good checkpoint, {checkpoint.path} (step {step}), is kept"
    raise TrainingStopped(f"{label}: {rows[-1]['stopped']}. Nothing was exported; {kept}. Lower {label}.lr or raise "
                          "the warmup (or look at the data at that position), then run the same command again: it "
                          "resumes from the last good checkpoint.")


def check_shared(path: str, rank: int, world_size: int, node_id: str) -> None:
    """Every rank writes its checkpoint shard under `path`: on several nodes that directory must be one shared file
    system. Rank 0 writes a token there and every rank looks for it (collective; object storage needs no check)."""
    if storage.is_uri(path) or world_size == 1:
        return
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(path, f".ptray-shared-check-{token[0]}")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write(node_id)
    dist.barrier()
    seen = [None] * world_size
    dist.all_gather_object(seen, (os.path.exists(probe), node_id))
    dist.barrier()
    if rank == 0:
        os.remove(probe)
    blind = sorted({node for visible, node in seen if not visible})
    if blind:
        raise UserError(f"{path} is not shared between the nodes: workers on node(s) {', '.join(blind)} do not see "
                        "what rank 0 writes there, so checkpoints would be split across machines. Put run.dir (or "
                        "run.storage_path) on a file system every node mounts (NFS, EFS, a ReadWriteMany volume), or "
                        "set run.storage_path to object storage (s3://...).")


@contextlib.contextmanager
def node_local_copy(path: str, label: str):
    """A checkpoint directory as a local path (collective). In object storage, one rank per node downloads it into a
    temporary directory and the node's other ranks read the same files: each node fetches a checkpoint once, not once
    per GPU."""
    if not storage.is_uri(path):
        yield path
        return
    ctx = ray.train.get_context()
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    local = os.path.join(tempfile.gettempdir(), f"ptray-download-{token[0]}")
    error = None
    if ctx.get_local_rank() == 0:
        try:
            storage.copy_dir(path, local)
            print(f"[{label}] downloaded {path} once for the {ctx.get_local_world_size()} worker(s) on this node",
                  flush=True)
        except Exception as e:  # every rank raises it, instead of the others waiting for files that never come
            error = f"{type(e).__name__}: {e}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    try:
        if any(errors):
            raise UserError(f"cannot download checkpoint {path}: {next(e for e in errors if e)}")
        yield local
        dist.barrier()  # every rank of the node is done with the files before they go
    finally:
        if ctx.get_local_rank() == 0:
            shutil.rmtree(local, ignore_errors=True)


def start_engine(cfg: Config, schedule: Schedule, model: torch.nn.Module, checkpoint_root: str, rank: int,
                 world_size: int, label: str) -> tuple[object, ckpt.TrainerState]:
    """The DeepSpeed engine and trainer state, restored from the newest checkpoint that verifies (collective).

    A checkpoint that fails verification is skipped with a warning naming it. On another world size, ZeRO's partitions
    no longer fit the ranks. Stages 1-2: the checkpoint is converted to DeepSpeed's universal format, whose
    per-parameter weights and Adam moments any world size can load. Stage 3: the consolidated weights load exactly
    and the Adam moments restart. Stage 0 has no partitions: it loads as it is.
    """
    from ptray import engine as ds

    for path in ckpt.candidates(checkpoint_root):
        with node_local_copy(path, label) as checkpoint_dir:
            problems = [None] * world_size
            dist.all_gather_object(problems, ckpt.verify(checkpoint_dir, rank, world_size))
            problem = next((p for p in problems if p), None)
            if problem:
                if rank == 0:
                    print(f"[{label}] WARNING: skipping checkpoint {path}: {problem}; trying the one before it",
                          flush=True)
                continue
            state = ckpt.read_trainer_state(checkpoint_dir)
            reshard = state.world_size != world_size and cfg.deepspeed.zero_stage > 0
            if reshard and cfg.deepspeed.zero_stage == 3:
                # Weights only: through a universal checkpoint, ZeRO-3 resumed 0.2% off the uninterrupted run after
                # three steps (stages 1-2 match within 1e-4), so the Adam moments restart instead.
                with ds.gathered(model):
                    ckpt.load_weights(model, ds.consolidated_state_dict(checkpoint_dir, zero_stage=3))
                engine = ds.initialize(model, cfg, schedule)
            elif reshard:  # each rank converts its own copy: no shared scratch space needed
                with tempfile.TemporaryDirectory() as universal_dir:
                    ds.to_universal(checkpoint_dir, universal_dir)
                    engine = ds.initialize(model, cfg, schedule, load_universal=True)
                    ds.load(engine, universal_dir)
            else:
                engine = ds.initialize(model, cfg, schedule)
                ds.load(engine, checkpoint_dir)
            torch.manual_seed(cfg.run.seed + 1 + rank)
            ckpt.load_rng(checkpoint_dir, rank)
        if rank == 0:
            how = ""
            if state.world_size != world_size:
                how = f"; world size {state.world_size} -> {world_size}: " + (
                    "all state restored" if not reshard else "weights restored, Adam moments restarted"
                    if cfg.deepspeed.zero_stage == 3 else "all state restored through a DeepSpeed universal checkpoint")
            print(f"[{label}] resumed from {path} at step {state.step}{how}", flush=True)
        return engine, state
    engine = ds.initialize(model, cfg, schedule)
    torch.manual_seed(cfg.run.seed + 1 + rank)  # per-rank stream for dropout
    return engine, ckpt.TrainerState(world_size=world_size)


def steps_from_env(name: str) -> set[int]:
    """Optimizer steps (1-based) listed in an environment variable as "5,8-10". The loop makes rank 0's loss NaN at the
    steps in PTRAY_INJECT_NONFINITE_STEPS, to rehearse the non-finite-loss handling end to end."""
    steps: set[int] = set()
    for part in filter(None, os.environ.get(name, "").replace(" ", "").split(",")):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host micro-batch on `device`. On a GPU through pinned memory and without waiting: a copy from pageable memory
    blocks the host until the GPU has finished all the work queued before it, a host sync in every micro-step."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def fingerprint(input_ids: torch.Tensor) -> int:
    """A position-weighted sum of a micro-batch's token ids: equal across runs iff they trained on the same tokens
    (in practice), so resume exactness can be checked from metrics.jsonl."""
    weights = torch.arange(1, input_ids.numel() + 1, dtype=torch.int64).view_as(input_ids)
    return int((input_ids.long().cpu() * weights).sum())


def probe_logits(engine, inputs: dict[str, torch.Tensor]) -> dict:
    """The trained model's logits on fixed inputs, stored with the final checkpoint to verify the export."""
    device = engine.device
    engine.eval()
    with torch.no_grad():
        logits = engine(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
    engine.train()
    return {"inputs": {k: v.cpu() for k, v in inputs.items()}, "logits": logits}
