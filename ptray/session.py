"""Connect to Ray: an existing cluster when an address is given (or RAY_ADDRESS is set), else a local in-process Ray."""

from __future__ import annotations

import contextlib
import logging
import os

import ray

from ptray.config import Config


@contextlib.contextmanager
def ray_session(cfg: Config):
    """Initialize Ray for a ptray command and shut it down afterwards (unless Ray was already running here)."""
    if ray.is_initialized():
        yield
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # else Train V2 echoes every worker print twice
    if not cfg.cluster.use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo) instead of probing for CUDA
    # Inside `ray job submit` the job's runtime_env already sets some of these, and Ray refuses to merge duplicates.
    runtime_env = {"env_vars": {k: v for k, v in env_vars.items() if k not in os.environ}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        # Local test mode: Ray Train reserves whole CPUs for its workers and Ray Data may only use what is left, so
        # advertise a couple of logical CPUs beyond the workers' share (threads are what actually share the cores).
        needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
        num_cpus = int(max(os.cpu_count() or 1, needed)) + 2
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per dataset execution is noise here
    try:
        yield
    finally:
        ray.shutdown()
