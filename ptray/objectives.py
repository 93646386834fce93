"""Training objectives as pure tensor functions: rows of packed tokens -> (model inputs, targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of seq_len + 1 tokens -> inputs row[:, :-1] and next-token targets row[:, 1:]."""
    return rows[:, :-1], rows[:, 1:]


def document_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart after each end-of-document token of a packed row: [[a b EOS c d]] -> [[0 1 2 0 1]].
    With these (and no attention mask) transformers keeps each document's attention within the document. The first
    segment of a row, a document continued from an earlier row, starts at 0 too."""
    length = inputs.size(1)
    index = torch.arange(length, device=inputs.device).expand_as(inputs)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 1:] = inputs[:, :-1] == eos_id  # a document starts right after an end-of-document token
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def masked_lm_batch(rows: torch.Tensor, *, mask_id: int, vocab_size: int, probability: float,
                    special_ids: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's recipe on rows[:, :-1]: pick `probability` of the (non-special) tokens as targets; of those, 80% become
    the mask token, 10% a random token, 10% stay unchanged. Non-targets get IGNORE_INDEX."""
    inputs = rows[:, :-1].clone()
    targets = inputs.clone()
    candidates = torch.ones_like(inputs, dtype=torch.bool)
    for special in special_ids:
        candidates &= inputs != special
    chosen = (torch.rand(inputs.shape, generator=generator) < probability) & candidates
    targets[~chosen] = IGNORE_INDEX
    roll = torch.rand(inputs.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = mask_id
    random_tokens = torch.randint(vocab_size, inputs.shape, generator=generator, dtype=inputs.dtype)
    replace = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[replace] = random_tokens[replace]
    return inputs, targets


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target positions (in fp32 for stability under bf16)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
