"""Throughput, MFU and `metrics.jsonl` (one JSON object per logged step; eval rows carry val_loss and val_ppl)."""

from __future__ import annotations

import json
import os
import time

import torch

from ptray.errors import DataError

# Dense (no sparsity) bf16 peak FLOP/s of one GPU from the vendors' datasheets, keyed by the exact name CUDA reports
# (`torch.cuda.get_device_name()`): variants of one chip differ (an H100 PCIe is 756 TFLOP/s, an SXM 989).
GPU_PEAK_FLOPS = {
    "NVIDIA B200": 2250e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 SXM5 80GB": 989e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
}


def peak_flops_per_worker(use_gpu: bool, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one worker's device, where the figure comes from: logged beside the MFU).

    `pretrain.peak_flops_per_worker` wins; then the datasheet figure of a GPU known by its exact name; otherwise a
    measured matmul rate (a practical peak, below the datasheet's)."""
    if configured > 0:
        return configured, "pretrain.peak_flops_per_worker"
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if name in GPU_PEAK_FLOPS:
            return GPU_PEAK_FLOPS[name], f"{name} datasheet dense bf16"
        return measured_matmul_flops(torch.device("cuda"), torch.bfloat16), \
            f"{name} measured bf16 matmul (not in ptray's datasheet table: set pretrain.peak_flops_per_worker)"
    return measured_matmul_flops(torch.device("cpu"), torch.float32), "measured fp32 CPU matmul"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Best achieved FLOP/s of a square matmul on this device with this process's threads: the CPU's practical peak."""
    generator = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone: resume must not see this
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


class MetricsLog:
    """Appends rows to `<run_dir>/metrics.jsonl` (rank 0 only), and to the run's experiment trackers if any
    (`ptray.trackers`). On resume, rows past the resumed step are dropped first, so the file always describes one
    consistent history."""

    def __init__(self, run_dir: str, resume_step: int, trackers=None):
        self.path, self.trackers = os.path.join(run_dir, "metrics.jsonl"), trackers
        if os.path.exists(self.path):
            rows, torn = _read_rows(self.path)
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            if len(kept) != len(rows) or torn:
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(self.path + ".tmp", self.path)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers:
            self.trackers.log(row)

    def close(self, finished: bool = True) -> None:
        if self.trackers:
            self.trackers.close(finished)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    return _read_rows(path)[0] if os.path.exists(path) else []


def _read_rows(path: str) -> tuple[list[dict], bool]:
    """(rows, whether the last line was torn). A process killed mid-write leaves half a final line: that row is
    dropped (its step is logged again after resume). A bad line anywhere else means the file was damaged."""
    lines = [line for line in open(path) if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DataError(f"{path} line {i + 1} is not JSON; the metrics log was modified. Restore it or move it "
                                "away (training resumes without it).") from None
            return rows, True
    return rows, False


def progress_line(row: dict, max_steps: int) -> str:
    return (f"step {row['step']:>6}/{max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:,.0f} tok/s | mfu {100 * row['mfu']:.2f}% | data wait {row['data_wait_s']:.3f}s")


PROFILE_FROM_STEP = 10  # steps before this are start-up (allocator, compilation, first collectives)


def step_profiler(run_dir: str, first_step: int, num_steps: int, cuda: bool):
    """A started torch.profiler that records `num_steps` optimizer steps from PROFILE_FROM_STEP on (or at once on a
    resumed run past it) and then writes `<run_dir>/profile/`; call `.step()` after every optimizer step. None when
    there is nothing to profile."""
    if num_steps <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    def write(prof) -> None:
        out = os.path.join(run_dir, "profile")
        os.makedirs(out, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out, "trace.json"))
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        with open(os.path.join(out, "top_ops.txt"), "w") as f:
            f.write(f"{num_steps} optimizer steps from step {first_step + wait + 2}, rank 0, sorted by {sort_by}\n")
            f.write(prof.key_averages().table(sort_by=sort_by, row_limit=40))
        print(f"[profile] {num_steps} steps profiled: {out}/top_ops.txt, {out}/trace.json", flush=True)

    wait = max(0, PROFILE_FROM_STEP - 2 - first_step)  # then one warm-up step; step k of the schedule is step k + 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=num_steps, repeat=1),
                       on_trace_ready=write)
    profiler.start()
    return profiler
