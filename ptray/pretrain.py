"""`ptray pretrain`: Ray Train workers x DeepSpeed ZeRO over the prepared token shards, then export to Hugging Face.

    ptray pretrain --config tiny                                   # 2 CPU workers, gloo, ~2 minutes
    ptray pretrain --config tiny deepspeed.zero_stage=3 pretrain.max_steps=50
    ray job submit --working-dir . -- python jobs/pretrain.py --config gpt2-124m   # on a GPU cluster

The driver (`pretrain`) checks the config against the prepared data, builds a TorchTrainer and exports the final
checkpoint. The worker (`train_loop_per_worker`) is one visible loop: forward, backward, step, log, eval, checkpoint.
Re-running the same command (same run.name / run.dir) resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ptray import checkpoint as ckpt
from ptray.config import Config, PretrainConfig, from_dict, resolved, save_config
from ptray.data.manifest import Manifest, Shard, verify_shards
from ptray.data.prepare import ensure_prepared
from ptray.data.tokenizer import tokenizer_hash
from ptray.errors import ConfigError, DataError
from ptray.metrics import MetricsLog, peak_flops_per_worker, progress_line
from ptray.model import build_model, flops_per_token, init_from_info, num_params, padded_vocab_size
from ptray.objectives import IGNORE_INDEX, causal_lm_batch, masked_lm_batch, token_loss

# ---- driver --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PretrainResult:
    run_dir: str
    export_dir: str
    checkpoint_dir: str
    metrics: dict


def pretrain(cfg: Config) -> PretrainResult:
    """Prepare the data if needed, train with Ray Train + DeepSpeed, export the final checkpoint (Ray must be up)."""
    cfg = resolved(cfg)
    manifest = ensure_prepared(cfg)
    prepared_dir = os.path.abspath(cfg.prepared_dir)
    verify_shards(manifest, prepared_dir)
    vocab_size = check_model_fits_data(cfg, manifest, prepared_dir)
    run_dir = os.path.abspath(cfg.run_dir)
    save_config(cfg, run_dir)

    train_ds = ray.data.read_parquet(manifest.shard_paths(prepared_dir, "train"),
                                     shuffle=ray.data.FileShuffleConfig(seed=cfg.run.seed)).select_columns(["input_ids"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "manifest": dataclasses.asdict(manifest),
                           "prepared_dir": prepared_dir, "run_dir": run_dir, "vocab_size": vocab_size},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
                                     placement_strategy=cfg.cluster.placement_strategy),
        run_config=RunConfig(name="train", storage_path=run_dir,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.pretrain.num_to_keep)),
        datasets={"train": train_ds},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
    )
    result = trainer.fit()
    assert result.checkpoint is not None, "training finished without a checkpoint"
    export_dir = os.path.join(run_dir, "export")
    with result.checkpoint.as_directory() as checkpoint_dir:
        ckpt.export_hf(cfg, checkpoint_dir, vocab_size=vocab_size, special_ids=special_ids(manifest),
                       tokenizer_dir=os.path.join(prepared_dir, manifest.tokenizer_dir), out_dir=export_dir)
    print(f"[pretrain] done: metrics {os.path.join(run_dir, 'metrics.jsonl')}, checkpoint {result.checkpoint.path}, "
          f"export {export_dir}", flush=True)
    return PretrainResult(run_dir=run_dir, export_dir=export_dir, checkpoint_dir=result.checkpoint.path,
                          metrics=result.metrics)


def special_ids(manifest: Manifest) -> dict[str, int | None]:
    return {"eos": manifest.eos_id, "pad": manifest.pad_id, "mask": manifest.mask_id}


def check_model_fits_data(cfg: Config, manifest: Manifest, prepared_dir: str) -> int:
    """Check model, data and batch sizes agree before any worker starts; return the embedding size to use."""
    if manifest.seq_len != cfg.data.seq_len:
        raise ConfigError(f"the prepared data in {prepared_dir} has seq_len {manifest.seq_len} but data.seq_len="
                          f"{cfg.data.seq_len}; run `ptray prepare` again or set data.seq_len={manifest.seq_len}.")
    tokenizer_dir = os.path.join(prepared_dir, manifest.tokenizer_dir)
    if tokenizer_hash(tokenizer_dir) != manifest.tokenizer_hash:
        raise DataError(f"the tokenizer in {tokenizer_dir} changed since the data was prepared (hash mismatch); "
                        "run `ptray prepare` again.")
    if cfg.model.init_from:
        hf = init_from_info(cfg.model.init_from)
        if hf.model_type != cfg.model.family:
            raise ConfigError(f"model.init_from={cfg.model.init_from!r} is a {hf.model_type!r} model but "
                              f"model.family={cfg.model.family!r}; set model.family={hf.model_type}.")
        vocab_size, max_positions = hf.vocab_size, getattr(hf, "max_position_embeddings", cfg.model.max_positions)
        where = f"model.init_from={cfg.model.init_from!r}"
    else:
        vocab_size = cfg.model.vocab_size or padded_vocab_size(manifest.vocab_size)
        max_positions, where = cfg.model.max_positions, "model.vocab_size"
    if manifest.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {manifest.vocab_size} tokens but the model's embedding ({where}) has only "
                          f"{vocab_size} rows; set model.vocab_size=0 (sized from the tokenizer) or >= "
                          f"{manifest.vocab_size}, or use the model's own tokenizer (data.tokenizer_path).")
    if cfg.data.seq_len > max_positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's {max_positions} positions; lower "
                          "data.seq_len (and prepare again) or raise model.max_positions.")
    if cfg.pretrain.objective == "mlm" and manifest.mask_id is None:
        raise ConfigError("pretrain.objective=mlm needs a tokenizer with a mask token; the prepared tokenizer has none.")
    rows_per_step = cfg.cluster.num_workers * cfg.pretrain.micro_batch_size * cfg.grad_accum_steps
    if manifest.num_train_rows < rows_per_step:
        raise DataError(f"the prepared data has {manifest.num_train_rows} training rows, fewer than one optimizer step "
                        f"needs ({rows_per_step} = pretrain.global_batch_size); add data or lower the batch size.")
    return vocab_size


# ---- worker --------------------------------------------------------------------------------------------------------


def lr_at(step: int, p: PretrainConfig) -> float:
    """Linear warmup, then cosine to min_lr, warmup-stable-decay (linear decay over the last decay_fraction),
    or constant."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    min_lr = p.lr * p.min_lr_ratio
    if p.schedule == "constant":
        return p.lr
    if p.schedule == "wsd":
        decay_start = int(p.max_steps * (1 - p.decay_fraction))
        if step < decay_start:
            return p.lr
        return p.lr + (min_lr - p.lr) * (step - decay_start) / max(1, p.max_steps - decay_start)
    progress = min(1.0, (step - p.warmup_steps) / max(1, p.max_steps - p.warmup_steps))
    return min_lr + 0.5 * (p.lr - min_lr) * (1 + math.cos(math.pi * progress))


def train_batches(shard, micro_batch_size: int, state: ckpt.TrainerState):
    """Micro-batches of packed rows, epoch after epoch, starting at the saved data position; `state` tracks it."""
    while True:
        skipped = 0
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size, drop_last=True, prefetch_batches=2,
                                              dtypes=torch.long):
            if skipped < state.batches_in_epoch:  # resuming mid-epoch: skip what was consumed before the checkpoint
                skipped += 1
                continue
            state.batches_in_epoch += 1
            yield batch["input_ids"]
        state.epoch += 1
        state.batches_in_epoch = 0


def read_rows(paths: list[str], row_len: int, max_rows: int) -> torch.Tensor:
    """The first `max_rows` packed rows of some shards, read directly with pyarrow (for validation and probes)."""
    chunks, total = [], 0
    for path in paths:
        if total >= max_rows:
            break
        column = pq.read_table(path, columns=["input_ids"])["input_ids"].combine_chunks()
        rows = np.asarray(column.flatten()).reshape(-1, row_len)
        chunks.append(rows[: max_rows - total])
        total += len(chunks[-1])
    return torch.from_numpy(np.concatenate(chunks)).long() if chunks else torch.empty(0, row_len, dtype=torch.long)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    raw_manifest = dict(loop_config["manifest"])
    manifest = Manifest(**{**raw_manifest, "train": [Shard(**s) for s in raw_manifest["train"]],
                           "val": [Shard(**s) for s in raw_manifest["val"]]})
    prepared_dir, run_dir, vocab_size = loop_config["prepared_dir"], loop_config["run_dir"], loop_config["vocab_size"]
    p = cfg.pretrain
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.cluster.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    from ptray import engine as ds  # imports DeepSpeed; after DS_ACCELERATOR is set
    device = ray.train.torch.get_device()

    # Same seed on every rank: identical initial weights before ZeRO partitions them.
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, vocab_size=vocab_size, special_ids=special_ids(manifest))
    model_flops_per_token = flops_per_token(model.config, num_params(model), cfg.data.seq_len)
    if p.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = ds.initialize(model, cfg)
    torch.manual_seed(cfg.run.seed + 1 + rank)  # per-rank stream for dropout

    state = ckpt.TrainerState(world_size=world_size)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            ds.load(engine, checkpoint_dir)
            state = ckpt.read_trainer_state(checkpoint_dir)
            ckpt.load_rng(checkpoint_dir, rank)
        if rank == 0:
            print(f"[pretrain] resumed from {checkpoint.path} at step {state.step}", flush=True)
    if state.world_size != world_size:  # the data position counts per-worker batches, so rescale it
        state.batches_in_epoch = state.batches_in_epoch * state.world_size // world_size
        state.world_size = world_size

    peak_flops, peak_source = peak_flops_per_worker(cfg.cluster.use_gpu, p.peak_flops_per_worker)
    log = MetricsLog(run_dir, state.step) if rank == 0 else None
    if rank == 0:
        print(f"[pretrain] {num_params(model):,} parameters, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, "
              f"{world_size} workers x {p.micro_batch_size} x {cfg.grad_accum_steps} accumulation; MFU against "
              f"{peak_flops / 1e9:,.1f} GFLOP/s per worker ({peak_source})", flush=True)

    row_len = manifest.seq_len + 1
    special = [i for i in (manifest.eos_id, manifest.pad_id, manifest.mask_id) if i is not None]

    def make_batch(rows: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if p.objective == "clm":
            return causal_lm_batch(rows)
        # Masks depend only on (seed, rank, position): the same after a resume.
        generator = torch.Generator().manual_seed(seed)
        return masked_lm_batch(rows, mask_id=manifest.mask_id, vocab_size=manifest.vocab_size,
                               probability=p.mlm_probability, special_ids=special, generator=generator)

    # Validation: every rank takes an equal slice (ZeRO-3 needs every rank in every forward).
    val_paths = manifest.shard_paths(prepared_dir, "val")
    val_all = read_rows(val_paths, row_len, world_size * p.eval_batches * p.micro_batch_size)
    per_rank = (len(val_all) // world_size) // p.micro_batch_size * p.micro_batch_size
    val_rows = val_all[rank::world_size][:per_rank]

    def evaluate() -> float | None:
        if per_rank == 0:
            return None
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(0, per_rank, p.micro_batch_size):
                inputs, targets = make_batch(val_rows[i: i + p.micro_batch_size], seed=cfg.run.seed * 7919 + i)
                logits = engine(input_ids=inputs.to(device)).logits
                num_targets = (targets != IGNORE_INDEX).sum()
                totals += torch.stack([token_loss(logits, targets.to(device)).double() * num_targets,
                                       num_targets.double().to(device)])
        engine.train()
        dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    def save_checkpoint(metrics: dict, probe: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            ds.save(engine, checkpoint_dir)
            ckpt.save_rng(checkpoint_dir, rank)
            if rank == 0:
                ckpt.write_trainer_state(state, checkpoint_dir)
                if probe is not None:
                    torch.save(probe, os.path.join(checkpoint_dir, ckpt.PROBE))
            # A barrier: every rank reports; Ray Train records the checkpoint once all ranks' files are in.
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir))

    batches = train_batches(ray.train.get_dataset_shard("train"), p.micro_batch_size, state)
    tokens_per_step = p.global_batch_size * manifest.seq_len
    window_loss = torch.zeros((), device=device)
    window_steps, window_data_wait, window_start = 0, 0.0, time.perf_counter()
    metrics: dict = {}
    engine.train()
    while state.step < p.max_steps:
        lr = lr_at(state.step, p)
        ds.set_lr(engine, lr)
        for micro_step in range(cfg.grad_accum_steps):
            wait_start = time.perf_counter()
            rows = next(batches)
            window_data_wait += time.perf_counter() - wait_start
            inputs, targets = make_batch(rows, seed=hash((cfg.run.seed, rank, state.epoch, state.batches_in_epoch)))
            logits = engine(input_ids=inputs.to(device)).logits
            loss = token_loss(logits, targets.to(device))
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the update only after the last micro-batch of the accumulation
            window_loss += loss.detach() / cfg.grad_accum_steps
        state.step += 1
        state.tokens += tokens_per_step
        window_steps += 1

        if state.step % p.log_every == 0 or state.step == p.max_steps:
            dist.all_reduce(window_loss)  # a sync point: the mean loss over ranks and the steps of this window
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            metrics = {"step": state.step, "loss": window_loss.item() / (world_size * window_steps), "lr": lr,
                       "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                       "mfu": model_flops_per_token * tokens_per_s / (peak_flops * world_size),
                       "data_wait_s": window_data_wait / window_steps, "grad_norm": ds.grad_norm(engine),
                       "epoch": state.epoch}
            if log:
                log.write(metrics)
                print(progress_line(metrics, p.max_steps), flush=True)
            window_loss.zero_()
            window_steps, window_data_wait, window_start = 0, 0.0, time.perf_counter()

        if (p.eval_every and state.step % p.eval_every == 0) or state.step == p.max_steps:
            val_loss = evaluate()
            if val_loss is not None:
                metrics = {**metrics, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
                if log:
                    log.write({"step": state.step, "tokens": state.tokens, "val_loss": val_loss,
                               "val_ppl": metrics["val_ppl"]})
                    print(f"step {state.step:>6}/{p.max_steps} | val_loss {val_loss:.4f} | "
                          f"val_ppl {metrics['val_ppl']:.2f}", flush=True)
            window_start = time.perf_counter()  # don't count eval time as training throughput

        if state.step == p.max_steps:
            save_checkpoint(metrics, probe=probe_logits(engine, val_all if len(val_all) else rows, make_batch, device))
        elif state.step % p.ckpt_every == 0:
            save_checkpoint(metrics)
            window_start = time.perf_counter()


def probe_logits(engine, rows: torch.Tensor, make_batch, device) -> dict:
    """The trained model's logits on two fixed rows, stored with the final checkpoint to verify the export."""
    inputs, _ = make_batch(rows[:2], seed=12345)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=inputs.to(device)).logits.float().cpu()
    engine.train()
    return {"input_ids": inputs.cpu(), "logits": logits}
