"""The one place DeepSpeed is called: ZeRO config, initialize, step, learning rate, save/load, resharding to another
world size, and weight consolidation.

Ray Train has already created the torch.distributed process group (NCCL on GPUs, gloo on CPUs) when these run;
DeepSpeed adopts it. On CPU, set DS_ACCELERATOR=cpu before the first import (`ptray.session` does it for workers).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import shutil
import sys

import torch

from ptray.config import Config
from ptray.errors import ConfigError
from ptray.schedule import Schedule, pretrain_schedule
from ptray.session import quiet_prints

CHECKPOINT_TAG = "ds"  # DeepSpeed's files live in <checkpoint>/ds/
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"  # see import_deepspeed


def import_deepspeed():
    """`import deepspeed`, without what it would import for features ptray never uses (every DeepSpeed import goes
    through here):
    - `import mlflow`, tried by DeepSpeed's autotuner: 1.3 s of DeepSpeed's 3 s import in every worker process.
      ptray's own MLflow logger still imports mlflow where it logs.
    - torch.compile for DeepSpeed's Muon optimizer, whose module every ZeRO-1/2/3 engine imports at start only to
      ask whether the optimizer is a Muon (ptray's is AdamW): its @torch.compile decorators pulled in TorchDynamo
      and Inductor, 1.4 s of every worker's start. The module is imported with its functions left uncompiled."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is here
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    if MUON_MODULE not in sys.modules:
        from deepspeed.runtime import compiler

        compile_decorator, compiler.compile = compiler.compile, lambda: (lambda function: function)
        try:
            with contextlib.suppress(ImportError):  # a DeepSpeed without Muon
                importlib.import_module(MUON_MODULE)
        finally:
            compiler.compile = compile_decorator
    return deepspeed


def deepspeed_config(cfg: Config, schedule: Schedule) -> dict:
    """The DeepSpeed JSON config of a stage: ZeRO and precision from `cfg`, batch and optimizer from `schedule`."""
    ds, p = cfg.deepspeed, schedule
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    return {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum_steps,
        "gradient_clipping": p.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": p.lr, "betas": [p.beta1, p.beta2], "eps": 1e-8, "weight_decay": p.weight_decay,
            "torch_adam": ds.torch_adam, **torch_adam_kwargs(cfg)}},
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # bf16 keeps 8 bits of mantissa: summing micro-batch gradients in it loses the small ones, so ZeRO (stages
        # 1-3) accumulates them in fp32. DeepSpeed has no fp32 accumulation without ZeRO: stage 0 sums in bf16.
        "data_types": {"grad_accum_dtype": "fp32" if ds.precision == "bf16" and ds.zero_stage > 0 else None},
        # torch's AdamW is fine with offloaded states; DeepSpeed otherwise insists on its compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": not ds.torch_adam,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def torch_adam_kwargs(cfg: Config) -> dict:
    """Extra arguments DeepSpeed hands to torch.optim.AdamW (`torch_adam`): on GPUs, torch's fused kernel (one launch
    for all parameters, nothing to build at start), unless the optimizer states live in CPU memory (offload)."""
    if cfg.deepspeed.torch_adam and cfg.cluster.use_gpu and not cfg.deepspeed.offload_optimizer:
        return {"fused": True}
    return {}


def prepare_fused_adam_build(capability: tuple[int, int], arch_list: str | None) -> str | None:
    """The TORCH_CUDA_ARCH_LIST under which DeepSpeed JIT-builds its fused Adam (`deepspeed.torch_adam=false`): the
    compute capability of the GPU actually present, e.g. "9.0", unless the environment already names architectures
    DeepSpeed can parse. DeepSpeed reads each entry as <int>.<int>[+PTX] and fails on torch's own names such as
    "9.0a" (deepspeedai/DeepSpeed#7589); building for every architecture torch knows also costs minutes.
    None: keep the environment's value."""
    entries = (arch_list or "").replace(";", " ").split()
    if entries and all(re.fullmatch(r"\d+\.\d+(\+PTX)?", e) for e in entries):
        return None
    return f"{capability[0]}.{capability[1]}"


def load_ops(cfg: Config) -> None:
    """The DeepSpeed ops a run JIT-builds at start. On GPU: its fused Adam (see `load_op`), unless torch's AdamW is
    used (`deepspeed.torch_adam`). On CPU: none. DeepSpeed's communication layer would build a shared-memory
    all-reduce that only its inference all-reduce uses (training's goes through torch.distributed); marked
    unavailable, it is not compiled on a machine's first run (~60 s on 2 cores, and no compiler is needed)."""
    if not cfg.cluster.use_gpu:
        import_deepspeed().ops.__compatible_ops__["deepspeed_shm_comm"] = False
    elif not cfg.deepspeed.torch_adam:
        load_op("FusedAdamBuilder")


@functools.cache
def load_op(builder_name: str) -> None:
    """Load (and on first use build, see `build_op`) one of DeepSpeed's ops by its builder's name into this process,
    so that DeepSpeed later finds it loaded."""
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed skips it too, or raises its own error when it needs it
    build_op(builder)


def build_op(builder) -> None:
    """`builder.load()` (a DeepSpeed OpBuilder), one process at a time under a kernel lock.

    torch guards each build with a lock *file* and every other process waits while it exists. A process killed while
    it holds one (Ray Train stops a worker group when one rank fails, often while the others are still starting)
    leaves the file behind, and every later run hangs on it in silence: CI once waited an hour. The kernel frees a
    `flock` when its holder dies, so a lock file found while holding ours was left by a dead process."""
    import fcntl

    from torch.utils.cpp_extension import _get_build_directory

    build_dir = _get_build_directory(builder.name, verbose=False)
    prefer_own_ninja()
    with open(os.path.join(os.path.dirname(build_dir), "ptray-build.lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released on close, or by the kernel if this process dies
        left = os.path.join(build_dir, "lock")
        if os.path.exists(left):
            os.remove(left)
            print(f"[ptray] removed {left}: a process killed while building {builder.name} left it, and every "
                  "later build would wait on it forever", flush=True)
        with quiet_prints():
            builder.load(verbose=False)


def prefer_own_ninja() -> None:
    """Put the directory of this Python (a virtualenv's bin/, which holds the `ninja` that DeepSpeed's pip install
    brought) first on PATH when it has a ninja. torch builds with the first ninja on PATH, and ninja versions disagree
    on their build log: a system ninja (1.11 here) and the virtualenv's (1.13) each took the other's build for stale,
    so starting `.venv/bin/ptray` without activating the virtualenv and then with it rebuilt the op every time
    (~50 s on 2 cores)."""
    own = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(own, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != own:
        os.environ["PATH"] = own + os.pathsep + path


def adopt_process_group(cfg: Config) -> None:
    """DeepSpeed's communication layer over the process group Ray Train created."""
    deepspeed = import_deepspeed()
    load_ops(cfg)
    with quiet_prints():
        deepspeed.init_distributed(dist_init_required=False)


def check_device(cfg: Config) -> None:
    """On a GPU worker, before anything is built: bf16 needs hardware support, and DeepSpeed's fused Adam is built for
    this device (see `prepare_fused_adam_build`)."""
    if not cfg.cluster.use_gpu:
        return
    name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    if cfg.deepspeed.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"deepspeed.precision=bf16, but this GPU ({name}, compute capability "
                          f"{capability[0]}.{capability[1]}) has no bf16 support; use deepspeed.precision=fp16 "
                          "(loss-scaled) or fp32.")
    if not cfg.deepspeed.torch_adam:
        arch_list = prepare_fused_adam_build(capability, os.environ.get("TORCH_CUDA_ARCH_LIST"))
        if arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: biases and norm weights get no weight decay, and a parameter with an
    `lr_scale` attribute (e.g. a finetuning head with its own learning rate) goes to a group that `set_lr` gives
    that multiple of the scheduled rate. Without any `lr_scale`: [decay, no decay]."""
    by_key: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            by_key.setdefault((getattr(p, "lr_scale", 1.0), p.dim() < 2), []).append(p)
    return [{"params": by_key[key], "weight_decay": 0.0 if key[1] else weight_decay, "lr_scale": key[0]}
            for key in sorted(by_key)]  # a fixed order: a resumed optimizer state maps onto the same groups


@contextlib.contextmanager
def partitioned_construction(cfg: Config):
    """Under ZeRO-3, a Hugging Face model built inside is partitioned across the ranks as it is constructed
    (transformers runs the construction under `deepspeed.zero.Init` and initializes each module's gathered weights on
    rank 0), so no rank ever holds a full copy of a model that may not fit one worker. Other stages: no effect."""
    if cfg.deepspeed.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Only what partitioning needs: DeepSpeed checks the global batch against a world size it does not know yet.
    config = {k: v for k, v in deepspeed_config(cfg, pretrain_schedule(cfg)).items()
              if k not in ("train_batch_size", "gradient_accumulation_steps")}
    zero3 = HfDeepSpeedConfig(config)  # transformers reads it through a weak reference: keep it alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # this construction only: nothing later takes transformers' ZeRO-3 paths
        del zero3


def gathered(model: torch.nn.Module):
    """Inside, a model built partitioned (see `partitioned_construction`) has its full weights on every rank, and what
    rank 0 writes into them is partitioned again on exit (collective). A plain model: no effect."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    deepspeed = import_deepspeed()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def held_params(model: torch.nn.Module) -> int:
    """Parameters this rank holds: its ZeRO-3 partitions, or every parameter."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def initialize(model: torch.nn.Module, cfg: Config, schedule: Schedule, *, load_universal: bool = False):
    """Wrap `model` in a DeepSpeed engine with AdamW over `param_groups(model)`.
    `load_universal`: the next `load` reads a universal checkpoint (see `to_universal`)."""
    deepspeed = import_deepspeed()
    load_ops(cfg)
    groups = param_groups(model, schedule.weight_decay)
    config = deepspeed_config(cfg, schedule)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config, dist_init_required=False)
    return engine


def compile_model(engine, cfg: Config) -> str | None:
    """`model.compile`: torch.compile the engine's module in place (compilation happens at the first forward).
    Returns a warning instead where this platform cannot compile; training then runs eagerly."""
    if not cfg.model.compile:
        return None
    if cfg.cluster.use_gpu:
        from torch.utils._triton import has_triton

        missing = None if has_triton() else "Triton is not installed (pip install triton)"
    else:
        missing = None if any(map(shutil.which, ("g++", "c++", "clang++"))) else "no C++ compiler is installed"
    if missing:
        return f"model.compile=true, but {missing}: training runs eagerly"
    engine.compile()
    return None


def set_lr(engine, lr: float) -> None:
    """The scheduled rate `lr`, times each group's `lr_scale` (see `param_groups`)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def step(engine, *, apply_update: bool = True) -> None:
    """`engine.step()` for the last micro-batch of an optimizer step. With `apply_update=False` DeepSpeed still reduces
    and clears the accumulated gradients and advances its counters, but weights and Adam state stay as they were.

    Every ZeRO stage and precision updates the weights through one call of the underlying torch optimizer's step()
    (ZeRO then copies its unchanged fp32 partitions back into the model), so suppressing that call skips the update
    everywhere. DeepSpeed's own overflow skip covers only some stages and misses an inf loss with finite gradients.
    """
    if apply_update:
        engine.step()
        return
    optimizer = engine.basic_optimizer
    optimizer.step = lambda *args, **kwargs: None  # shadows the class's step() for this one call
    try:
        engine.step()
    finally:
        del optimizer.step


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def save(engine, checkpoint_dir: str) -> None:
    """Every rank writes its ZeRO shards into `<checkpoint_dir>/ds/` (collective: call on all ranks)."""
    engine.save_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG, save_latest=False)


def load(engine, checkpoint_dir: str) -> None:
    """Restore module, optimizer and ZeRO partitions from `<checkpoint_dir>/ds/` (collective)."""
    path, _ = engine.load_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    assert path is not None, f"DeepSpeed found no checkpoint in {checkpoint_dir}/{CHECKPOINT_TAG}"


def to_universal(checkpoint_dir: str, out_dir: str) -> None:
    """Rewrite a checkpoint's ZeRO shards, which are cut for one world size, as DeepSpeed's universal checkpoint in
    `<out_dir>/ds/`: every parameter's fp32 weights, Adam moments and step as whole tensors, loadable on any world size
    by an engine made with `initialize(..., load_universal=True)`. Runs in this process (one worker: no forking)."""
    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as convert

    convert(argparse.Namespace(
        input_folder=os.path.join(checkpoint_dir, CHECKPOINT_TAG), output_folder=os.path.join(out_dir, CHECKPOINT_TAG),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True))  # ptray saves no Megatron tensor-parallel layout info; none is needed


def consolidated_state_dict(checkpoint_dir: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint's shards, on CPU, in one process (no process group needed)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if zero_stage == 0:
        states = torch.load(os.path.join(checkpoint_dir, CHECKPOINT_TAG, "mp_rank_00_model_states.pt"),
                            map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with quiet_prints():  # a line per step of the consolidation
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
