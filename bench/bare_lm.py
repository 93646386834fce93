"""A bare single-process PyTorch reference for pretraining quality: the same HF GPT-2 model ptray builds, trained on
ptray's prepared shards with plain AdamW and the same schedule, no Ray, no DeepSpeed. `bench/quality.py` compares
ptray's validation curve with this one.

    python bench/bare_lm.py /tmp/bare-test/data      # tiny check: 2 layers x 64 on a `ptray prepare` output, ~1 min

(make the data with: python -c "from ptray.config import load_config; from ptray.session import ray_session;
 from ptray.data.prepare import prepare;
 cfg = load_config('tiny', ['run.dir=/tmp/bare-test', 'data.builtin_docs=4000']);
 exec('with ray_session(cfg): prepare(cfg)')")
"""

import math
import os
import sys
import time

import torch

from ptray import storage
from ptray.config import ModelConfig
from ptray.data.manifest import read_manifest
from ptray.data.tokenizer import load_tokenizer
from ptray.model import build_model, padded_vocab_size
from ptray.objectives import IGNORE_INDEX, causal_lm_batch, token_loss
from ptray.pretrain import read_rows
from ptray.schedule import Schedule


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss over `rows` (as ptray's LanguageModelingTask.evaluate)."""
    model.eval()
    total_loss, num_targets = 0.0, 0
    for i in range(0, len(rows), batch_size):
        inputs, targets = causal_lm_batch(rows[i: i + batch_size])
        n = int((targets != IGNORE_INDEX).sum())
        total_loss += token_loss(model(input_ids=inputs).logits, targets).item() * n
        num_targets += n
    model.train()
    return total_loss / num_targets


def bare_pretrain(prepared_dir: str, *, num_layers: int, hidden_size: int, num_heads: int, max_positions: int,
                  max_steps: int, batch_size: int, lr: float, warmup_steps: int, weight_decay: float = 0.1,
                  beta2: float = 0.95, min_lr_ratio: float = 0.1, eval_every: int, num_val_rows: int = 128,
                  seed: int = 0, save_dir: str = "") -> dict:
    """Pretrain a GPT-2 on all train rows of ptray's prepared data in one process; evaluate on the first
    `num_val_rows` val rows every `eval_every` steps and at the end.

    Returns {"curve": [(step, val_loss, val_ppl)], "final_val_loss", "final_val_ppl", "train_losses" (per step),
    "tokens" (trained on), "seconds" (training wall time, evaluation included), "model"}. With `save_dir`, the model
    and the prepared tokenizer are saved there in Hugging Face format (like ptray's export), ready to finetune.
    """
    torch.set_num_threads(os.cpu_count())
    manifest = read_manifest(prepared_dir)
    if max_positions < manifest.seq_len:
        raise ValueError(f"max_positions={max_positions} is below the prepared seq_len={manifest.seq_len}.")
    row_len = manifest.seq_len + 1
    train_rows = read_rows(manifest.shard_paths(prepared_dir, "train"), row_len, manifest.num_train_rows)
    val_rows = read_rows(manifest.shard_paths(prepared_dir, "val"), row_len, num_val_rows)
    if len(val_rows) == 0:
        raise ValueError(f"{prepared_dir} has no validation rows; prepare it with data.val_fraction > 0.")

    torch.manual_seed(seed)  # as ptray: seed, then build, so both start from the same weights
    model_cfg = ModelConfig(family="gpt2", num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                            max_positions=max_positions)
    model = build_model(model_cfg, vocab_size=padded_vocab_size(manifest.vocab_size),
                        special_ids={"eos": manifest.eos_id, "pad": manifest.pad_id})
    # Decay matrices only; biases and LayerNorm weights (dim < 2) get none, as in ptray's engine.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, beta2), eps=1e-8)
    schedule = Schedule(max_steps=max_steps, global_batch_size=batch_size, micro_batch_size=batch_size,
                        grad_accum_steps=1, lr=lr, warmup_steps=warmup_steps, decay="cosine", min_lr_ratio=min_lr_ratio,
                        decay_fraction=0.0, weight_decay=weight_decay, beta1=0.9, beta2=beta2, grad_clip=1.0,
                        log_every=eval_every, eval_every=eval_every, ckpt_every=max_steps, max_nonfinite_steps=1)
    sampler = torch.Generator().manual_seed(seed)
    curve, train_losses = [], []
    started = time.perf_counter()
    for step in range(max_steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        inputs, targets = causal_lm_batch(train_rows[torch.randint(len(train_rows), (batch_size,), generator=sampler)])
        loss = token_loss(model(input_ids=inputs).logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == max_steps:
            val_loss = evaluate(model, val_rows, batch_size)
            curve.append((step + 1, val_loss, math.exp(min(val_loss, 50.0))))
            print(f"[bare] step {step + 1}/{max_steps} train_loss {loss.item():.4f} val_loss {val_loss:.4f} "
                  f"val_ppl {curve[-1][2]:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    if save_dir:
        model.save_pretrained(save_dir)
        load_tokenizer(storage.join(prepared_dir, manifest.tokenizer_dir)).save_pretrained(save_dir)
    return {"curve": curve, "final_val_loss": curve[-1][1], "final_val_ppl": curve[-1][2],
            "train_losses": train_losses, "tokens": max_steps * batch_size * manifest.seq_len, "seconds": seconds,
            "model": model}


def bare_finetune(cfg, pretrained: str, *, init: str = "pretrained", lr: float | None = None, seed: int = 0) -> dict:
    """Classification finetuning of `pretrained` (or its architecture from scratch) in one process with fixed,
    untuned hyperparameters (cfg.finetune's), on the labelled data exactly as ptray reads and tokenizes it.
    Returns {"final_val_accuracy", "best_val_accuracy", "curve": [(epoch, val_accuracy)]}."""
    import dataclasses

    from ptray.finetune import finetune_model, load_labelled
    from ptray.trial import finetune_schedule

    torch.set_num_threads(os.cpu_count())
    ft = dataclasses.replace(cfg.finetune, init=init, lr=lr or cfg.finetune.lr)
    cfg = dataclasses.replace(cfg, finetune=ft)
    data = load_labelled(cfg, load_tokenizer(pretrained))
    torch.manual_seed(seed)
    model = finetune_model(cfg, pretrained, len(data.id2label), data.id2label)
    num_train = len(data.train["labels"])
    steps = ft.epochs * max(1, num_train // ft.global_batch_size)  # full batches only: a simpler loop than ptray's
    schedule = dataclasses.replace(finetune_schedule(cfg, num_train, len(data.val["labels"])), max_steps=steps,
                                   warmup_steps=max(1, int(ft.warmup_ratio * steps)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    curve, step = [], 0
    for epoch in range(ft.epochs):
        order = torch.randperm(num_train, generator=generator)
        for start in range(0, num_train - ft.global_batch_size + 1, ft.global_batch_size):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            index = order[start: start + ft.global_batch_size]
            logits = model(input_ids=data.train["input_ids"][index],
                           attention_mask=data.train["attention_mask"][index]).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), data.train["labels"][index])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        model.eval()
        with torch.no_grad():
            predictions = torch.cat([model(input_ids=data.val["input_ids"][i: i + 64],
                                           attention_mask=data.val["attention_mask"][i: i + 64]).logits.argmax(-1)
                                     for i in range(0, len(data.val["labels"]), 64)])
        model.train()
        curve.append((epoch + 1, (predictions == data.val["labels"]).float().mean().item()))
        print(f"[bare finetune {init}] epoch {epoch + 1}/{ft.epochs} val_accuracy {curve[-1][1]:.4f}", flush=True)
    return {"final_val_accuracy": curve[-1][1], "best_val_accuracy": max(a for _, a in curve), "curve": curve}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    result = bare_pretrain(sys.argv[1], num_layers=2, hidden_size=64, num_heads=4, max_positions=128, max_steps=60,
                           batch_size=32, lr=3e-3, warmup_steps=10, eval_every=30)
    print({k: v for k, v in result.items() if k not in ("model", "train_losses")})
