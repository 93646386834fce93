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
import functools
import json
import math
import os
import shutil
import time
import zlib

import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ptray import checkpoint as ckpt
from ptray import storage
from ptray.config import Config, from_dict, save_config, snapshot_steps, with_absolute_paths
from ptray.data.loader import MixtureStream, RowStream, ShardRows, rank_micro_batches
from ptray.data.manifest import Manifest, Shard, verify_shards
from ptray.data.prepare import corpus_files, ensure_prepared
from ptray.data.stream import Delivered, start_stream, stream_dir, train_dataset
from ptray.data.tokenizer import tokenizer_hash
from ptray.errors import ConfigError, DataError
from ptray.loop import fit, raise_if_stopped, setup_worker, snapshot_dir, worker_entry
from ptray.model import build_model, flops_per_token, init_from_info, num_params, padded_vocab_size
from ptray.objectives import IGNORE_INDEX, causal_lm_batch, document_positions, masked_lm_batch, token_loss
from ptray.schedule import pretrain_schedule
from ptray.session import fit_with_retries, train_logging, worker_scaling

# ---- driver --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PretrainResult:
    run_dir: str
    export_dir: str
    checkpoint_dir: str
    metrics: dict


def pretrain(cfg: Config) -> PretrainResult:
    """Prepare the data if needed, train with Ray Train + DeepSpeed, export the final checkpoint (Ray must be up)."""
    cfg = with_absolute_paths(cfg)
    scaling = worker_scaling(cfg)  # before any work: fail fast if the workers can never be placed
    storage_path = cfg.run.storage_path or cfg.run_dir  # checkpoints: shared directory or object store
    storage.check_writable(storage_path, "run.storage_path")
    streamed = cfg.data.ingest == "ray_data"
    if streamed:  # the rows stream from the corpus through Ray Data; only tokenizer and validation rows come first
        manifest, prepared_dir = start_stream(cfg, corpus_files(cfg)), stream_dir(cfg)
    else:
        manifest, prepared_dir = ensure_prepared(cfg), cfg.prepared_dir
        verify_shards(manifest, prepared_dir)
    vocab_size = check_model_fits_data(cfg, manifest, prepared_dir)
    run_dir = cfg.run_dir
    bound_to = resume_key(cfg, manifest)
    checkpoint_root = storage.join(storage_path, "train")
    check_resume(bound_to, checkpoint_root, run_dir)  # before config.yaml is replaced
    save_config(cfg, run_dir)

    def trainer() -> TorchTrainer:  # built again for each attempt: a streamed run restarts from the newest position
        delivered = streamed_position(checkpoint_root) if streamed else {}
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "manifest": dataclasses.asdict(manifest),
                               "prepared_dir": prepared_dir, "run_dir": run_dir, "vocab_size": vocab_size,
                               "bound_to": bound_to, "delivered": delivered, "checkpoint_root": checkpoint_root},
            datasets={"train": train_dataset(cfg, manifest, delivered)} if streamed else None,
            scaling_config=scaling,
            run_config=RunConfig(name="train", storage_path=storage_path, logging_config=train_logging(),
                                 failure_config=FailureConfig(max_failures=0),  # retries: fit_with_retries
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.pretrain.num_to_keep)),
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"))

    result = fit_with_retries(trainer, max_failures=cfg.cluster.max_failures, label="pretrain")
    raise_if_stopped(run_dir, result.checkpoint, "pretrain")
    assert result.checkpoint is not None, "training finished without a checkpoint"
    export_dir = os.path.join(run_dir, "export")
    with result.checkpoint.as_directory() as checkpoint_dir:
        ckpt.export_hf(cfg, checkpoint_dir, vocab_size=vocab_size, special_ids=special_ids(manifest),
                       tokenizer_dir=storage.join(prepared_dir, manifest.tokenizer_dir), out_dir=export_dir)
    for step in snapshot_steps(cfg):  # intermediate points of pretraining, to finetune from (sweep)
        snapshot = snapshot_dir(run_dir, step)
        if not os.path.isdir(os.path.join(snapshot, "export")) and not os.path.isdir(os.path.join(snapshot, "ds")):
            why = (f"beyond this run's {cfg.pretrain.max_steps} steps" if step > cfg.pretrain.max_steps else
                   "this run had passed that step before sweep.pretrained_steps named it")
            print(f"[pretrain] WARNING: no snapshot at step {step} ({why}); a sweep that finetunes from it will stop",
                  flush=True)
        elif not os.path.isdir(os.path.join(snapshot, "export")):
            ckpt.export_hf(cfg, snapshot, vocab_size=vocab_size, special_ids=special_ids(manifest),
                           tokenizer_dir=storage.join(prepared_dir, manifest.tokenizer_dir),
                           out_dir=os.path.join(snapshot, "export"))
            shutil.rmtree(os.path.join(snapshot, "ds"), ignore_errors=True)  # the export is all the sweep needs
    print(f"[pretrain] done: metrics {os.path.join(run_dir, 'metrics.jsonl')}, checkpoint {result.checkpoint.path}, "
          f"export {export_dir}", flush=True)
    return PretrainResult(run_dir=run_dir, export_dir=export_dir, checkpoint_dir=result.checkpoint.path,
                          metrics=result.metrics)


def resume_key(cfg: Config, manifest: Manifest) -> dict:
    """What a pretraining checkpoint is bound to: the model's shape, how DeepSpeed laid out its state, and the data
    (tokenizer and prepared rows). Optimization settings (lr, steps, batch) and the world size may change on resume."""
    key = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()
           if k not in ("compile", "attention")}  # the kernels: how it computes, not what
    key.update({"deepspeed.zero_stage": cfg.deepspeed.zero_stage, "deepspeed.precision": cfg.deepspeed.precision,
                "pretrain.objective": cfg.pretrain.objective, "data.seq_len": manifest.seq_len,
                "tokenizer": manifest.tokenizer_hash, "prepared data": manifest.content_hash})
    return key


def check_resume(key: dict, checkpoint_root: str, run_dir: str) -> None:
    """Refuse to resume checkpoints of another model, layout or data: DeepSpeed would fail deep inside a worker, or,
    worse, continue on other data without a word."""
    newest = ckpt.candidates(checkpoint_root)[:1]
    if not newest or not storage.exists(storage.join(newest[0], ckpt.TRAINER_STATE)):
        return
    saved = json.loads(storage.read_text(storage.join(newest[0], ckpt.TRAINER_STATE))).get("bound_to") or {}
    changed = [f"{name} {saved[name]!r} -> {value!r}" for name, value in key.items()
               if name in saved and saved[name] != value and "" not in (saved[name], value)]  # "": not recorded
    if changed:
        raise ConfigError(f"{run_dir} holds checkpoints ({newest[0]}) that this configuration cannot resume: "
                          f"{'; '.join(changed)}. Use another run.dir (or run.name) for a new run, or restore those "
                          "settings (and data) to resume this one.")


def streamed_position(checkpoint_root: str) -> dict:
    """data.ingest=ray_data: the rows the newest committed checkpoint has trained (`TrainerState.delivered`). The
    stream is built without them; the workers check that they resumed that same checkpoint."""
    for path in ckpt.candidates(checkpoint_root):
        if storage.exists(storage.join(path, ckpt.COMMIT)):
            return json.loads(storage.read_text(storage.join(path, ckpt.TRAINER_STATE))).get("delivered") or {}
    return {}


def special_ids(manifest: Manifest) -> dict[str, int | None]:
    return {"eos": manifest.eos_id, "pad": manifest.pad_id, "mask": manifest.mask_id}


def check_model_fits_data(cfg: Config, manifest: Manifest, prepared_dir: str) -> int:
    """Check model, data and batch sizes agree before any worker starts; return the embedding size to use."""
    if manifest.seq_len != cfg.data.seq_len:
        raise ConfigError(f"the prepared data in {prepared_dir} has seq_len {manifest.seq_len} but data.seq_len="
                          f"{cfg.data.seq_len}; run `ptray prepare` again or set data.seq_len={manifest.seq_len}.")
    tokenizer_dir = storage.join(prepared_dir, manifest.tokenizer_dir)
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
        raise ConfigError(f"the tokenizer has {manifest.vocab_size} tokens but the model's embedding ({where}) "
                          f"has only {vocab_size} rows; set model.vocab_size=0 (sized from the tokenizer) or >= "
                          f"{manifest.vocab_size}, or use the model's own tokenizer (data.tokenizer_path).")
    if cfg.data.seq_len > max_positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's {max_positions} positions; lower "
                          "data.seq_len (and prepare again) or raise model.max_positions.")
    if cfg.pretrain.objective == "mlm" and manifest.mask_id is None:
        raise ConfigError("pretrain.objective=mlm needs a tokenizer with a mask token; "
                          "the prepared tokenizer has none.")
    if manifest.train and manifest.num_train_rows < cfg.pretrain.global_batch_size:  # (streamed: no shards)
        raise DataError(f"the prepared data has {manifest.num_train_rows} training rows, fewer than one optimizer step "
                        f"needs (pretrain.global_batch_size={cfg.pretrain.global_batch_size}); add data or lower the "
                        "batch size.")
    return vocab_size


# ---- worker --------------------------------------------------------------------------------------------------------


def read_rows(paths: list[str], row_len: int, max_rows: int) -> torch.Tensor:
    """The first `max_rows` packed rows of some shards (for validation and probes)."""
    return torch.from_numpy(ShardRows(paths, row_len).head(max_rows)).long()


def training_stream(cfg: Config, manifest: Manifest,
                    prepared_dir: str) -> tuple[RowStream | MixtureStream, ShardRows]:
    """The seeded order of the training rows and a reader whose cache holds a shuffle window (plus the next one's
    first row groups: a micro-batch may straddle two windows)."""
    window_chunks = max(1, cfg.data.shuffle_window_rows // manifest.rows_per_group)
    rows_per_shard = [s.num_rows for s in manifest.train]
    if manifest.sources:  # a mixture: each source shuffled on its own, then interleaved by weight
        stream = MixtureStream(
            [RowStream(rows_per_shard[first:end], chunk_rows=manifest.rows_per_group, seed=cfg.run.seed * 65536 + i + 1,
                       window_chunks=window_chunks)
             for i, (first, end) in enumerate(source["train_shards"] for source in manifest.sources)],
            first_shards=[source["train_shards"][0] for source in manifest.sources],
            weights=[source["weight"] for source in manifest.sources])
    else:
        stream = RowStream(rows_per_shard, chunk_rows=manifest.rows_per_group, seed=cfg.run.seed,
                           window_chunks=window_chunks)
    reader = ShardRows(manifest.shard_paths(prepared_dir, "train"), manifest.seq_len + 1,
                       cache_groups=window_chunks + 2)
    return stream, reader


class LanguageModelingTask:
    """Causal or masked LM over the prepared shards: what `loop.fit` needs from pretraining."""

    def __init__(self, cfg: Config, manifest: Manifest, prepared_dir: str, rank: int, world_size: int):
        self.cfg, self.manifest, self.prepared_dir, self.rank = cfg, manifest, prepared_dir, rank
        self.special = [i for i in (manifest.eos_id, manifest.pad_id, manifest.mask_id) if i is not None]
        self.world_size = world_size
        # Created on first use, at the data position of the (possibly resumed) state.
        self.stream, self.batches = None, None
        # Validation: every rank takes an equal slice (ZeRO-3 needs every rank in every forward).
        p = cfg.pretrain
        self.val_all = read_rows(manifest.shard_paths(prepared_dir, "val"), manifest.seq_len + 1,
                                 world_size * p.eval_batches * p.micro_batch_size)
        per_rank = (len(self.val_all) // world_size) // p.micro_batch_size * p.micro_batch_size
        self.val_rows = self.val_all[rank::world_size][:per_rank]

    def make_batch(self, rows: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Model inputs and `targets` of some packed rows."""
        if self.cfg.pretrain.objective == "clm":
            inputs, targets = causal_lm_batch(rows)
            if self.cfg.data.document_masking:
                return {"input_ids": inputs, "position_ids": document_positions(inputs, self.manifest.eos_id),
                        "targets": targets}
            return {"input_ids": inputs, "targets": targets}
        # Masks depend only on (seed, rank, data position): the same after a resume.
        inputs, targets = masked_lm_batch(rows, mask_id=self.manifest.mask_id, vocab_size=self.manifest.vocab_size,
                                          probability=self.cfg.pretrain.mlm_probability, special_ids=self.special,
                                          generator=torch.Generator().manual_seed(seed))
        return {"input_ids": inputs, "targets": targets}

    def next_batch(self, state: ckpt.TrainerState) -> dict[str, torch.Tensor]:
        m, p = self.manifest, self.cfg.pretrain
        if self.batches is None:
            self.stream, reader = training_stream(self.cfg, m, self.prepared_dir)
            self.batches = rank_micro_batches(self.stream, reader, position=state.rows_consumed,
                                              global_batch_rows=p.global_batch_size,
                                              micro_batch_rows=p.micro_batch_size,
                                              rank=self.rank, world_size=self.world_size)
        step_end, first_row, rows = next(self.batches)
        state.rows_consumed = step_end  # the position once this optimizer step is done: what a checkpoint records
        state.epoch = first_row // m.num_train_rows
        # MLM masks depend only on (seed, stream position): the same after a resume.
        return self.make_batch(torch.from_numpy(rows).long(), seed=hash((self.cfg.run.seed, first_row)))

    def position_metrics(self, state: ckpt.TrainerState) -> dict[str, int]:
        """For a mixture: the tokens trained from each source so far (`tokens_<name>` in metrics.jsonl)."""
        if not self.manifest.sources or self.batches is None:
            return {}
        return {f"tokens_{source['name']}": self.stream.source_position(i, state.rows_consumed) * self.manifest.seq_len
                for i, source in enumerate(self.manifest.sources)}  # counted like `tokens`: seq_len per row

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "targets"}
        if self.cfg.pretrain.objective == "clm":  # no key/value cache in training (transformers masks documents
            inputs["use_cache"] = False           # by their position ids only without one)
        return token_loss(engine(**inputs).logits, batch["targets"])

    def evaluate(self, engine) -> dict[str, float]:
        if len(self.val_rows) == 0:
            return {}
        totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
        micro = self.cfg.pretrain.micro_batch_size
        for i in range(0, len(self.val_rows), micro):
            batch = {k: v.to(engine.device) for k, v in
                     self.make_batch(self.val_rows[i: i + micro], seed=self.cfg.run.seed * 7919 + i).items()}
            num_targets = (batch["targets"] != IGNORE_INDEX).sum()
            totals += torch.stack([self.loss(engine, batch).double() * num_targets, num_targets.double()])
        dist.all_reduce(totals)
        val_loss = (totals[0] / totals[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        rows = self.val_all if len(self.val_all) >= 2 else read_rows(
            self.manifest.shard_paths(self.prepared_dir, "train"), self.manifest.seq_len + 1, 2)
        batch = self.make_batch(rows[:2], seed=12345)
        return {k: v for k, v in batch.items() if k != "targets"}


class StreamedLanguageModelingTask(LanguageModelingTask):
    """data.ingest=ray_data: this rank's rows come from its share of the Ray Data stream (see data/stream.py)."""

    def __init__(self, cfg: Config, manifest: Manifest, prepared_dir: str, rank: int, world_size: int,
                 delivered: dict):
        super().__init__(cfg, manifest, prepared_dir, rank, world_size)
        self.delivered = delivered  # what the stream was built without: the resumed checkpoint's position
        self.trained: list[tuple[int, int, int]] = []  # (epoch, source, index) of the rows since the last checkpoint

    def next_batch(self, state: ckpt.TrainerState) -> dict[str, torch.Tensor]:
        if self.batches is None:
            if state.delivered != self.delivered:
                raise DataError("the resumed checkpoint is not the newest committed one (that one failed its "
                                "verification, see the warning above), but the data stream was built from the newest "
                                "one's position. Delete the newest checkpoint directory and rerun to resume from the "
                                "one before.")
            p = self.cfg.pretrain
            self.batches = iter(ray.train.get_dataset_shard("train").iter_batches(
                batch_size=p.micro_batch_size, batch_format="numpy", prefetch_batches=4,
                local_shuffle_buffer_size=self.cfg.data.shuffle_window_rows,
                local_shuffle_seed=self.cfg.run.seed * 1009 + self.rank + 7919 * state.step))
        batch = next(self.batches, None)
        if batch is None or len(batch["input_ids"]) < self.cfg.pretrain.micro_batch_size:
            raise DataError("the data stream ran out before pretrain.max_steps; lower pretrain.max_steps or add "
                            "corpus files.")
        rows = list(zip(batch["epoch"].tolist(), batch["source"].tolist(), batch["index"].tolist()))
        self.trained += rows
        if os.environ.get("PTRAY_TRACE_ROWS"):  # a test's record of every row trained: step, ids and tokens' CRC
            trace_rows(os.environ["PTRAY_TRACE_ROWS"], state.step, self.rank, rows, batch["input_ids"])
        state.epoch = max(epoch for epoch, _, _ in rows)
        state.rows_consumed += len(rows) * self.world_size  # rows trained by all ranks (for the logs only)
        return self.make_batch(torch.from_numpy(batch["input_ids"]).long(), seed=hash((self.cfg.run.seed, rows[0])))

    def record_position(self, state: ckpt.TrainerState) -> None:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, self.trained)
        delivered = Delivered(state.delivered)
        delivered.merge([row for rows in gathered for row in rows])
        state.delivered = self.delivered = delivered.to_dict()
        self.trained = []


def trace_rows(trace_dir: str, step: int, rank: int, rows: list[tuple[int, int, int]], tokens) -> None:
    """Append `{started, step, rank, rows: [[epoch, source, index, crc32 of the tokens], ...]}` to this process's
    file; `started` (the process's first record) tells a restarted attempt's records from those it replaced."""
    global _trace_started
    _trace_started = _trace_started or time.time()
    record = {"started": _trace_started, "step": step, "rank": rank,
              "rows": [[*row, zlib.crc32(t.tobytes())] for row, t in zip(rows, tokens)]}
    with open(os.path.join(trace_dir, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


_trace_started = 0.0


@worker_entry
def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    raw = dict(loop_config["manifest"])
    manifest = Manifest(**{**raw, "train": [Shard(**s) for s in raw["train"]], "val": [Shard(**s) for s in raw["val"]]})
    rank, world_size, _ = setup_worker(cfg)
    torch.manual_seed(cfg.run.seed)  # same seed on every rank: identical initial weights before ZeRO partitions them
    from ptray import engine as ds

    with ds.partitioned_construction(cfg):
        model = build_model(cfg.model, vocab_size=loop_config["vocab_size"], special_ids=special_ids(manifest))
    if cfg.deepspeed.zero_stage == 3 and rank == 0:
        print(f"[pretrain] model built partitioned (ZeRO-3 zero.Init): rank 0 holds {ds.held_params(model):,} of "
              f"{num_params(model):,} parameters", flush=True)
    if cfg.pretrain.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.data.ingest == "ray_data":
        task = StreamedLanguageModelingTask(cfg, manifest, loop_config["prepared_dir"], rank, world_size,
                                            loop_config["delivered"])
    else:
        task = LanguageModelingTask(cfg, manifest, loop_config["prepared_dir"], rank, world_size)
    fit(cfg, pretrain_schedule(cfg), task, model, run_dir=loop_config["run_dir"],
        checkpoint_root=loop_config["checkpoint_root"],
        flops_per_token=functools.partial(flops_per_token, model.config, num_params(model)), label="pretrain",
        snapshot_steps=tuple(snapshot_steps(cfg)), bound_to=loop_config["bound_to"])
