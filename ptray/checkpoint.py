"""Checkpoint layout, trainer state, and export to Hugging Face format.

A checkpoint is one directory that Ray Train assembles from what every rank wrote:

    checkpoint_<time>/
      ds/                     DeepSpeed: model states and each rank's ZeRO optimizer (and, in stage 3, parameter) shards
      trainer_state.json      rank 0: step, tokens seen, data position, world size
      rng_rank<r>.pt          each rank: torch RNG state and the Ray node that wrote the rank's shards
      metrics.json            rank 0: the metrics reported with this checkpoint (how sweeps pick a trial's best)
      probe.pt                final checkpoint only: probe inputs and the trained model's logits on them
      commit.json             the commit marker: every file above (of every rank) with its size and CRC32

A checkpoint counts only if its commit marker is there and every file it lists has the listed size and checksum, so a
save interrupted on any rank, a truncated upload, or a file damaged later is detected; resume then falls back to the
newest checkpoint that verifies, with a warning naming the one it skipped. Exports are built in a temporary
directory, checked against the probe logits, and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass

import torch

from ptray import engine, storage
from ptray.config import Config
from ptray.data.tokenizer import load_tokenizer
from ptray.errors import UserError
from ptray.model import build_model

TRAINER_STATE = "trainer_state.json"
PROBE = "probe.pt"
METRICS = "metrics.json"
COMMIT = "commit.json"


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps completed."""
    tokens: int = 0
    """Training tokens consumed over all workers."""
    epoch: int = 0
    """Passes over the training data started so far (0-based index of the current one)."""
    rows_consumed: int = 0
    """Pretraining's data position: rows of the training stream all workers have consumed (see data/loader.py)."""
    batches_in_epoch: int = 0
    """Finetuning's data position: micro-batches each worker has consumed in the current epoch."""
    world_size: int = 1
    skipped_steps: int = 0
    """Optimizer steps skipped because the loss was not finite."""
    best_metric: float | None = None
    """Finetuning: the best evaluation so far. Only an evaluation that beats it writes a checkpoint."""
    delivered: dict = dataclasses.field(default_factory=dict)
    """data.ingest=ray_data: the rows trained so far, per epoch and source (see data/stream.py `Delivered`)."""
    bound_to: dict = dataclasses.field(default_factory=dict)
    """Pretraining: what the checkpoint cannot be resumed without (model shape, ZeRO stage, precision, tokenizer,
    prepared data); the driver compares it with the new config before a rerun starts (`pretrain.check_resume`)."""


def write_trainer_state(state: TrainerState, checkpoint_dir: str) -> None:
    with open(os.path.join(checkpoint_dir, TRAINER_STATE), "w") as f:
        json.dump(dataclasses.asdict(state), f)


def read_trainer_state(checkpoint_dir: str) -> TrainerState:
    with open(os.path.join(checkpoint_dir, TRAINER_STATE)) as f:
        return TrainerState(**json.load(f))


def save_rng(checkpoint_dir: str, rank: int, node_id: str) -> None:
    """This rank's random streams: CPU, and every CUDA device's (dropout on GPU draws from those)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"torch": torch.get_rng_state(), "cuda": cuda, "node_id": node_id},
               os.path.join(checkpoint_dir, f"rng_rank{rank}.pt"))


def load_rng(checkpoint_dir: str, rank: int) -> bool:
    path = os.path.join(checkpoint_dir, f"rng_rank{rank}.pt")
    if not os.path.exists(path):
        return False  # a different world size: this rank has no saved stream
    saved = torch.load(path, weights_only=False)
    torch.set_rng_state(saved["torch"])
    if saved.get("cuda") and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])
    return True


def file_digests(checkpoint_dir: str) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file under `checkpoint_dir` (what this rank wrote)."""
    digests = {}
    for folder, _, names in os.walk(checkpoint_dir):
        for name in names:
            path = os.path.join(folder, name)
            digests[os.path.relpath(path, checkpoint_dir)] = [os.path.getsize(path), _crc32(path)]
    return digests


def write_commit(checkpoint_dir: str, digests: dict[str, list[int]]) -> None:
    """Rank 0: the marker listing every rank's files (gathered before the upload)."""
    with open(os.path.join(checkpoint_dir, COMMIT), "w") as f:
        json.dump({"files": digests}, f)


def verify(checkpoint_dir: str, rank: int = 0, world_size: int = 1) -> str | None:
    """Why the checkpoint is not usable (None if it is). Each rank checks every `world_size`-th listed file, so the
    checksums are read once in total, in parallel."""
    marker = os.path.join(checkpoint_dir, COMMIT)
    if not os.path.exists(marker):
        return f"it has no {COMMIT} (the save was interrupted)"
    try:
        files = json.load(open(marker))["files"]
    except (ValueError, KeyError) as e:
        return f"its {COMMIT} is unreadable ({e})"
    for name in sorted(files)[rank::world_size]:
        size, crc = files[name]
        path = os.path.join(checkpoint_dir, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, not {size}"
        if _crc32(path) != crc:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def candidates(checkpoint_root: str) -> list[str]:
    """This run's checkpoint directories (local paths or URIs), newest first."""
    names = [n for n in storage.list_dirs(checkpoint_root) if n.startswith("checkpoint_")]
    return [storage.join(checkpoint_root, n) for n in sorted(names, reverse=True)]  # names carry the time


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load consolidated weights; tied weights (embedding = output head) appear once, anything else missing is an
    error."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    names_by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        names_by_storage.setdefault(tensor.data_ptr(), []).append(name)
    shared = {n for names in names_by_storage.values() if len(names) > 1 for n in names}
    missing = [k for k in missing if k not in shared]
    assert not missing and not unexpected, f"checkpoint/model mismatch: missing {missing}, unexpected {unexpected}"


def export_hf(cfg: Config, checkpoint_dir: str, *, vocab_size: int, special_ids: dict, tokenizer_dir: str,
              out_dir: str) -> str:
    """Export a pretraining checkpoint: see `export_model`."""
    model = build_model(cfg.model, vocab_size=vocab_size, special_ids=special_ids)
    return export_model(cfg, checkpoint_dir, model=model, tokenizer_dir=tokenizer_dir, out_dir=out_dir)


def export_model(cfg: Config, checkpoint_dir: str, *, model: torch.nn.Module, tokenizer_dir: str, out_dir: str,
                 unwrap=None) -> str:
    """Consolidate a checkpoint's ZeRO shards into `model` (a fresh instance of the trained architecture) and save
    it in Hugging Face format (safetensors, config, tokenizer). `unwrap(model)`, if given, returns the model to save
    instead (e.g. with LoRA adapters merged into the weights).

    The export is reloaded with its class's `from_pretrained` and its logits compared with the trained model's probe
    logits before it is renamed into place; a mismatch raises and leaves any previous export untouched.
    """
    load_weights(model, engine.consolidated_state_dict(checkpoint_dir, cfg.deepspeed.zero_stage))
    if unwrap is not None:
        model = unwrap(model)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_pretrained(tmp)
        load_tokenizer(tokenizer_dir).save_pretrained(tmp)
        _check_probe(cfg, checkpoint_dir, tmp, type(model))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_probe(cfg: Config, checkpoint_dir: str, export_dir: str, model_class) -> None:
    probe_path = os.path.join(checkpoint_dir, PROBE)
    if not os.path.exists(probe_path):
        return
    probe = torch.load(probe_path, weights_only=False)
    model = model_class.from_pretrained(export_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**probe["inputs"]).logits
    tolerance = 1e-4 if cfg.deepspeed.precision == "fp32" else 5e-2
    diff = (logits - probe["logits"]).abs().max().item()
    if diff > tolerance * max(1.0, probe["logits"].abs().max().item()):
        raise UserError(f"export check failed: exported logits differ from the trained model's by {diff:.3g}; "
                        f"the export was not written. Checkpoint: {checkpoint_dir}")
