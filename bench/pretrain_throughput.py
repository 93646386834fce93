"""Training throughput: `ptray pretrain` (2 Ray Train workers, DeepSpeed ZeRO-2) vs a bare single-process PyTorch loop,
same model, same global batch, same cores, measured side by side in one run. Prints tokens/s of each and the ratio,
and for both ingest modes (prepared shards, and the corpus streamed through Ray Data: data.ingest=ray_data) the
share of each step the workers spent waiting for data.

    python bench/pretrain_throughput.py                                   # tiny model (2 layers, width 64)
    python bench/pretrain_throughput.py model.num_layers=4 model.hidden_size=256 model.num_heads=8

Extra arguments are ptray config overrides applied to both sides.
"""

import os
import statistics
import sys
import tempfile
import time

import torch

from ptray.config import load_config
from ptray.data.manifest import read_manifest
from ptray.data.prepare import prepare
from ptray.metrics import read_metrics
from ptray.model import build_model, padded_vocab_size
from ptray.objectives import causal_lm_batch, token_loss
from ptray.pretrain import pretrain, read_rows
from ptray.session import ray_session

STEPS, WARMUP_STEPS = 80, 20


def bare_pytorch_tokens_per_s(cfg, manifest, prepared_dir) -> tuple[float, dict]:
    """The same model and global batch in one process using all cores: the no-framework baseline. Returns tokens/s
    and the seconds per phase over the timed steps."""
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=padded_vocab_size(manifest.vocab_size), special_ids={})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.lr, weight_decay=cfg.pretrain.weight_decay)
    rows = read_rows(manifest.shard_paths(prepared_dir, "train"), manifest.seq_len + 1,
                     STEPS * cfg.pretrain.global_batch_size)
    batch = cfg.pretrain.global_batch_size
    phases = dict.fromkeys(("data", "forward", "backward", "step"), 0.0)
    for step in range(STEPS):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
            phases = dict.fromkeys(phases, 0.0)
        t0 = time.perf_counter()
        inputs, targets = causal_lm_batch(rows[step * batch: (step + 1) * batch])
        t1 = time.perf_counter()
        loss = token_loss(model(input_ids=inputs, use_cache=False).logits, targets)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.pretrain.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            phases[name] += seconds
    return (STEPS - WARMUP_STEPS) * batch * manifest.seq_len / (time.perf_counter() - start), phases


def main(overrides: list[str]) -> None:
    run_dir = tempfile.mkdtemp(prefix="ptray-bench-")
    cfg = load_config("tiny", [f"run.dir={run_dir}", f"pretrain.max_steps={STEPS}", "pretrain.log_every=10",
                               f"pretrain.ckpt_every={STEPS}", f"pretrain.eval_every={STEPS}", "deepspeed.zero_stage=2",
                               "cluster.num_workers=2", *overrides])
    streamed = load_config("tiny", [f"run.dir={run_dir}-streamed", *[f"{k}={v}" for k, v in [
        ("pretrain.max_steps", STEPS), ("pretrain.log_every", 10), ("pretrain.ckpt_every", STEPS),
        ("pretrain.eval_every", STEPS), ("deepspeed.zero_stage", 2), ("cluster.num_workers", 2)]], *overrides,
        "data.ingest=ray_data"])
    with ray_session(cfg):
        prepare(cfg)
        manifest = read_manifest(cfg.prepared_dir)
        bare, bare_phases = bare_pytorch_tokens_per_s(cfg, manifest, cfg.prepared_dir)
        pretrain(cfg)
        pretrain(streamed)
    ptray, mfu, wait = measured(cfg)
    streamed_tokens_per_s, _, streamed_wait = measured(streamed)
    print(f"\nmodel: {cfg.model.family} {cfg.model.num_layers} layers x {cfg.model.hidden_size}, global batch "
          f"{cfg.pretrain.global_batch_size} x {cfg.data.seq_len} tokens, {os.cpu_count()} cores")
    print(f"bare PyTorch, 1 process        : {bare:12,.0f} tokens/s")
    print(f"ptray, 2 workers, ZeRO-2 (gloo): {ptray:12,.0f} tokens/s  (MFU {100 * mfu:.1f}% of measured CPU peak)")
    print(f"ratio ptray / bare             : {ptray / bare:12.2f}")
    timed_steps = STEPS - WARMUP_STEPS
    print("seconds per step, by phase     : " + ", ".join(f"{k} {v / timed_steps * 1e3:.1f} ms"
                                                        for k, v in bare_phases.items()) + " (bare)")
    breakdown = [r for r in read_metrics(cfg.run_dir) if "time_breakdown_s" in r][-1]["time_breakdown_s"]
    print("                                 " + ", ".join(f"{k} {breakdown[k] / STEPS * 1e3:.1f} ms" for k in
                                                        ("data", "forward", "backward", "step", "logging"))
          + " (ptray, rank 0, all steps; backward includes ZeRO's gradient reduction)")
    print(f"data wait, share of step time  : shards {100 * wait:.2f}%, ray_data {100 * streamed_wait:.2f}% "
          f"(ray_data: {streamed_tokens_per_s:,.0f} tokens/s)")


def measured(cfg) -> tuple[float, float, float]:
    """Median tokens/s, MFU and data wait per step as a share of the step, after the warm-up steps (rank 0's log)."""
    rows = [r for r in read_metrics(cfg.run_dir) if "tokens_per_s" in r and r["step"] > WARMUP_STEPS]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in rows)
    step_s = cfg.pretrain.global_batch_size * cfg.data.seq_len / tokens_per_s
    return (tokens_per_s, statistics.median(r["mfu"] for r in rows),
            statistics.median(r["data_wait_s"] for r in rows) / step_s)


if __name__ == "__main__":
    main(sys.argv[1:])
