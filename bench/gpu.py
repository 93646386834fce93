"""GPU throughput, side by side in one run: a bare single-GPU PyTorch loop (eager and torch.compile) and `ptray
pretrain` through the full Ray path (Ray Train worker, DeepSpeed ZeRO, ptray's loader and loop), on the GPT-2-small
and Llama-1B shapes of the shipped configs, bf16. Prints one table: tokens/s per GPU, MFU against the exact device's
datasheet peak (ptray's own lookup), peak memory, and the ratio of each ptray row to its bare reference.

    python bench/gpu.py                                # one GPU: GPT-2 and Llama rows, ~15 min on an H100/H200
    python bench/gpu.py --only gpt2                    # GPT-2-small shape only (~5 min)
    python bench/gpu.py --only llama --zero 1 2 3      # Llama-1B over ZeRO stages, activation checkpointing on/off
    python bench/gpu.py --workers 8                    # ptray rows on 1, 2, 4 and 8 GPUs: the scaling table
    python bench/gpu.py --only gpt2 --profile 5        # ... and where each ptray step's time goes (torch.profiler)
    python bench/gpu.py --tiny                         # CPU check of this script (tiny shapes, 1 worker), ~3 min

Each ptray row is a `ptray pretrain` subprocess with its own local Ray, stopped once it has logged enough windows
(no final checkpoint or export is timed); its log is kept under --out. Both sides run on the same data: the built-in
corpus prepared once per sequence length (the text does not change the speed), with the model's embedding sized as the
shipped configs size it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

from ptray.config import load_config
from ptray.metrics import peak_flops_per_worker, read_metrics
from ptray.model import build_model, flops_per_token, num_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# shape -> (config, embedding rows, micro-batch) as the shipped configs train them
SHAPES = {"gpt2": ("gpt2-124m", 50304, 16), "llama": ("llama-1b", 32000, 4)}
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=0",
        "model.intermediate_size=0", "model.max_positions=128", "data.seq_len=128", "cluster.use_gpu=false",
        "deepspeed.precision=fp32", "cluster.cpus_per_worker=1"]


def shape_config(shape: str, tiny: bool, extra: list[str] = ()):
    name, vocab, micro = SHAPES[shape]
    return load_config(name, [f"model.vocab_size={vocab if not tiny else 1024}",
                              f"pretrain.micro_batch_size={micro if not tiny else 4}", *(TINY if tiny else []),
                              *extra])


def bare_row(shape: str, *, compiled: bool, checkpointing: bool, tiny: bool, steps: int, warmup: int) -> dict:
    """The shape's model (built by ptray's model code) in a plain loop: bf16 autocast, fused AdamW, gradient
    clipping, SDPA attention, random tokens, one process on one device."""
    cfg = shape_config(shape, tiny)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=cfg.model.vocab_size, special_ids={}).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    batch, seq_len = cfg.pretrain.micro_batch_size, cfg.data.seq_len
    inputs = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens_per_s = steps * batch * seq_len / (time.perf_counter() - start)
    peak, _ = peak_flops_per_worker(device.type == "cuda")
    row = {"tokens_per_s": tokens_per_s,
           "mfu": tokens_per_s * flops_per_token(model.config, num_params(model), seq_len) / peak,
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del model, optimizer, forward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def prepare_data(shape: str, out: str, tiny: bool) -> str:
    """The built-in corpus prepared at the shape's sequence length (once; reused by later runs)."""
    cfg = shape_config(shape, tiny)
    prepared = os.path.join(out, f"data-{shape}-{cfg.data.seq_len}")
    if not os.path.exists(os.path.join(prepared, "manifest.json")):
        command = [sys.executable, "-m", "ptray.cli", "prepare", "--config", SHAPES[shape][0], *(TINY if tiny else []),
                   f"run.dir={out}/prepare-{shape}", f"data.prepared_dir={prepared}", "data.train_files=[builtin]",
                   "data.builtin_docs=20000", "data.min_chars=20", "data.vocab_size=4096"]
        subprocess.run(command, check=True, cwd=REPO)
    return prepared


def ptray_row(shape: str, *, prepared: str, out: str, name: str, workers: int, zero: int, checkpointing: bool,
              compiled: bool, tiny: bool, windows: int, timeout_s: float, profile_steps: int = 0) -> dict:
    """`ptray pretrain` on `workers` GPUs at the shape's micro-batch (no accumulation), stopped after `windows`
    logged windows beyond the first two (start-up, compilation); the median window is the row's figure."""
    cfg = shape_config(shape, tiny)
    micro, log_every = cfg.pretrain.micro_batch_size, 5
    run_dir = os.path.join(out, name)
    cpus = max(1, (os.cpu_count() or 2) // workers - 1) if not tiny else 1
    command = [sys.executable, "-m", "ptray.cli", "pretrain", "--config", SHAPES[shape][0], *(TINY if tiny else []),
               f"model.vocab_size={SHAPES[shape][1] if not tiny else 1024}", f"run.dir={run_dir}",
               f"data.prepared_dir={prepared}", f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={cpus}",
               "cluster.max_failures=0", f"pretrain.micro_batch_size={micro}",
               f"pretrain.global_batch_size={micro * workers}", "pretrain.max_steps=100000",
               f"pretrain.log_every={log_every}", "pretrain.eval_every=100000", "pretrain.ckpt_every=100000",
               "pretrain.warmup_steps=10", f"deepspeed.zero_stage={zero}", "deepspeed.offload_optimizer=false",
               f"pretrain.activation_checkpointing={str(checkpointing).lower()}",
               f"model.compile={str(compiled).lower()}", f"pretrain.profile_steps={profile_steps}",
               "sweep.pretrained_steps=[]"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        deadline, rows = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline and proc.poll() is None:
            rows = [r for r in read_metrics_quietly(run_dir) if "tokens_per_s" in r][2:]
            if len(rows) >= windows:
                break
            time.sleep(2)
        exited = proc.poll()
        stop(proc)
    if len(rows) < windows:
        lines = open(os.path.join(out, f"{name}.log")).read().strip().splitlines() or ["(no output)"]
        reason = "timed out" if exited is None else f"exit {exited}"
        return {"error": f"{reason}: {lines[-1][:150]} (log: {out}/{name}.log)"}
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows) / workers,
            "mfu": statistics.median(r["mfu"] for r in rows),
            "max_memory_gib": max((r.get("max_memory_gib") or 0) for r in rows) or None}


def stop(proc: subprocess.Popen) -> None:
    """End a ptray subprocess and everything it started (its Ray, the workers holding the GPU) before the next row."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left
    proc.wait()
    time.sleep(2)


def read_metrics_quietly(run_dir: str) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except Exception:  # the file is being appended to
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(SHAPES), help="one shape only")
    parser.add_argument("--zero", type=int, nargs="+", help="ZeRO stages of the ptray rows (default: the config's)")
    parser.add_argument("--workers", type=int, default=1, help="ptray rows also on 2, 4, ... up to this many GPUs")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks this script, not a GPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each bare row")
    parser.add_argument("--windows", type=int, default=4, help="logged windows (5 steps each) of each ptray row")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each ptray row")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many steps of each ptray row (pretrain.profile_steps): <out>/<row>/profile/")
    parser.add_argument("--out", default="/tmp/ptray-gpu-bench", help="prepared data, runs and logs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (or --tiny for a CPU check of the script)")
    device = torch.cuda.get_device_name() if not args.tiny else "CPU"
    peak, source = peak_flops_per_worker(not args.tiny)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"device: {device}, {torch.cuda.device_count() if not args.tiny else 0} GPU(s); peak {peak / 1e12:.1f} "
          f"TFLOP/s ({source}); ptray commit {commit}; torch {torch.__version__}", flush=True)
    worker_counts = [w for w in (1, 2, 4, 8, 16) if w <= args.workers] or [1]
    compile_options = [False] if args.no_compile else [False, True]
    results = []

    def record(shape, what, reference, row):
        results.append({"shape": shape, "row": what, "reference": reference, **row})
        print(json.dumps(results[-1]), flush=True)

    for shape in [args.only] if args.only else ["gpt2", "llama"]:
        cfg = shape_config(shape, args.tiny)
        steps, warmup = (args.steps, 3) if not args.tiny else (5, 1)
        checkpointing_options = [False, True] if shape == "llama" else [False]
        for checkpointing in checkpointing_options:
            for compiled in compile_options if not checkpointing else [False]:
                what = f"bare{', torch.compile' if compiled else ''}{', act. ckpt' if checkpointing else ''}"
                record(shape, what, None, bare_row(shape, compiled=compiled, checkpointing=checkpointing,
                                                   tiny=args.tiny, steps=steps, warmup=warmup))
        prepared = prepare_data(shape, args.out, args.tiny)
        for zero in args.zero or [cfg.deepspeed.zero_stage]:
            for checkpointing in checkpointing_options:
                for compiled in compile_options:
                    for workers in worker_counts:
                        name = f"ptray-{shape}-z{zero}-w{workers}{'-ckpt' if checkpointing else ''}" \
                               f"{'-compile' if compiled else ''}"
                        reference = f"bare{', torch.compile' if compiled else ''}" \
                                    f"{', act. ckpt' if checkpointing else ''}"
                        what = f"ptray, {workers} worker{'s' * (workers > 1)}, ZeRO-{zero}" \
                               f"{', model.compile' if compiled else ''}{', act. ckpt' if checkpointing else ''}"
                        record(shape, what, reference, ptray_row(
                            shape, prepared=prepared, out=args.out, name=name, workers=workers, zero=zero,
                            checkpointing=checkpointing, compiled=compiled, tiny=args.tiny, windows=args.windows,
                            timeout_s=args.timeout, profile_steps=args.profile))

    print(f"\n{device}, bf16{' (tiny shapes on CPU, fp32)' if args.tiny else ''}; tokens/s per GPU, MFU against "
          f"{peak / 1e12:.1f} TFLOP/s; ratio: against the bare row named\n")
    print("| shape | run | tokens/s per GPU | MFU | peak memory | ratio |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['shape']} | {r['row']} | {r['error']} | | | |")
            continue
        bare = next((b for b in results if b["shape"] == r["shape"] and b["row"] == r["reference"]
                     and "tokens_per_s" in b), None)
        ratio = f"{r['tokens_per_s'] / bare['tokens_per_s']:.2f} of {r['reference']}" if bare else ""
        memory = f"{r['max_memory_gib']:.1f} GiB" if r.get("max_memory_gib") else ""
        print(f"| {r['shape']} | {r['row']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {memory} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
