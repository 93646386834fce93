"""engine.py against a real DeepSpeed engine in this process (one rank, gloo): a skipped update leaves the weights and
Adam state untouched for every ZeRO stage, whether the loss was NaN or inf (an inf loss can have finite gradients,
which DeepSpeed alone would apply)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ptray import engine as ds  # noqa: E402
from ptray.config import load_config  # noqa: E402
from ptray.model import build_model  # noqa: E402
from ptray.schedule import pretrain_schedule  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in rendezvous}
    # DeepSpeed reads these; restored after, so later tests' subprocesses don't inherit them
    os.environ.update(rendezvous)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value


def _engine(zero_stage: int, precision: str):
    cfg = load_config("tiny", [f"deepspeed.zero_stage={zero_stage}", f"deepspeed.precision={precision}",
                               "cluster.num_workers=1", "pretrain.global_batch_size=4", "pretrain.micro_batch_size=2",
                               "model.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=128, special_ids={"eos": 0, "pad": 0, "mask": None})
    return ds.initialize(model, cfg, pretrain_schedule(cfg))


def _optimizer_state(engine) -> list[torch.Tensor]:
    """The fp32 master weights and Adam moments: what the basic optimizer owns on every ZeRO stage (its state is keyed
    by the master weights; ZeRO-3 swaps its param_groups during a step, so read the state's keys)."""
    tensors = []
    for param, state in engine.basic_optimizer.state.items():
        tensors += [param.detach().clone()] + [v.detach().clone() for v in state.values() if torch.is_tensor(v)]
    assert tensors, "no optimizer state to compare"
    return tensors


def _optimizer_step(engine, inputs, fault: str | None = None, apply_update: bool = True) -> None:
    for i, micro_batch in enumerate(inputs.split(2)):  # two micro-batches: gradient accumulation
        loss = engine(input_ids=micro_batch, labels=micro_batch).loss
        if fault == "nan" and i == 1:
            loss = loss * float("nan")
        elif fault == "inf" and i == 1:
            loss = loss + float("inf")  # non-finite loss, finite gradients
        engine.backward(loss)
        if i == 0:
            engine.step()
    ds.step(engine, apply_update=apply_update)


def _eval_loss(engine, inputs) -> float:
    with torch.no_grad():
        return engine(input_ids=inputs, labels=inputs).loss.item()


@pytest.mark.parametrize("zero_stage,precision,fault", [
    (0, "fp32", "nan"), (0, "fp32", "inf"), (1, "fp32", "inf"), (2, "fp32", "nan"), (2, "fp32", "inf"),
    (3, "fp32", "nan"), (3, "fp32", "inf"), (2, "bf16", "inf"), (3, "bf16", "nan")])
def test_a_skipped_update_leaves_weights_and_adam_state_unchanged(zero_stage, precision, fault):
    engine = _engine(zero_stage, precision)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 128, (4, 16), generator=generator) for _ in range(3)]
    _optimizer_step(engine, batches[0])  # Adam moments exist from here on
    before, loss_before = _optimizer_state(engine), _eval_loss(engine, batches[2])

    _optimizer_step(engine, batches[1], fault=fault, apply_update=False)
    after = _optimizer_state(engine)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert _eval_loss(engine, batches[2]) == loss_before  # the model's own (e.g. bf16 or ZeRO-3) copy too

    _optimizer_step(engine, batches[1])  # the next clean step updates again
    assert not all(torch.equal(a, b) for a, b in zip(_optimizer_state(engine), before))
    assert _eval_loss(engine, batches[2]) != loss_before


@pytest.mark.parametrize("zero_stage,precision,accumulate_in", [(2, "bf16", "fp32"), (3, "bf16", "fp32"),
                                                                 (1, "bf16", "fp32"), (0, "bf16", None),
                                                                 (2, "fp32", None)])
def test_bf16_accumulates_gradients_in_fp32_under_zero(zero_stage, precision, accumulate_in):
    from ptray.config import load_config
    from ptray.engine import deepspeed_config

    cfg = load_config("tiny", [f"deepspeed.zero_stage={zero_stage}", f"deepspeed.precision={precision}"])
    assert deepspeed_config(cfg, pretrain_schedule(cfg))["data_types"]["grad_accum_dtype"] == accumulate_in


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_gpu_configs_hand_torchs_fused_adamw_to_deepspeed(zero_stage):
    """On GPUs the optimizer is torch's fused AdamW, through DeepSpeed's torch_adam path (nothing to build at start).
    The engine is made here from a GPU config on CPU, where torch's fused AdamW also runs."""
    cfg = load_config("tiny", [f"deepspeed.zero_stage={zero_stage}", "cluster.use_gpu=true", "cluster.num_workers=1",
                               "pretrain.global_batch_size=4", "pretrain.micro_batch_size=2"])
    assert ds.deepspeed_config(cfg, pretrain_schedule(cfg))["optimizer"]["params"]["fused"] is True
    torch.manual_seed(0)
    engine = ds.initialize(build_model(cfg.model, vocab_size=128, special_ids={"eos": 0, "pad": 0, "mask": None}), cfg,
                            pretrain_schedule(cfg))
    assert type(engine.basic_optimizer) is torch.optim.AdamW and engine.basic_optimizer.defaults["fused"] is True
    inputs = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    before = _eval_loss(engine, inputs)
    for _ in range(3):
        _optimizer_step(engine, inputs)
    assert _eval_loss(engine, inputs) < before


def test_cpu_and_offloaded_optimizers_are_torchs_plain_adamw():
    tiny = load_config("tiny")
    offloaded = load_config("tiny", ["cluster.use_gpu=true", "deepspeed.offload_optimizer=true"])  # states on the CPU
    for cfg in (tiny, offloaded):
        assert "fused" not in ds.deepspeed_config(cfg, pretrain_schedule(cfg))["optimizer"]["params"]


def test_a_compiled_model_trains_like_the_eager_one():
    """model.compile: DeepSpeed's engine.compile (torch.compile, inductor on CPU) gives the eager losses, step by step;
    the attention is PyTorch's SDPA kernel in both."""
    def losses(compiled: bool) -> list[float]:
        cfg = load_config("tiny", [f"model.compile={str(compiled).lower()}", "cluster.num_workers=1",
                                   "pretrain.global_batch_size=4", "pretrain.micro_batch_size=2"])
        torch.manual_seed(0)
        model = build_model(cfg.model, vocab_size=128, special_ids={"eos": 0, "pad": 0, "mask": None})
        assert model.config._attn_implementation == "sdpa"
        engine = ds.initialize(model, cfg, pretrain_schedule(cfg))
        assert ds.compile_model(engine, cfg) is None and engine.is_compiled == compiled
        inputs = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
        out = []
        for _ in range(3):
            _optimizer_step(engine, inputs)
            out.append(_eval_loss(engine, inputs))
        return out

    eager, compiled = losses(False), losses(True)
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_compile_falls_back_to_eager_where_the_platform_cannot(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = load_config("tiny", ["model.compile=true"])
    warning = ds.compile_model(object(), cfg)  # no compiler found: the engine is not touched
    assert warning == "model.compile=true, but no C++ compiler is installed: training runs eagerly"
