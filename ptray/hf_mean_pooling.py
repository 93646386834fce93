"""Mean-pooling sequence classifiers for transformers' auto classes.

ptray copies this file into every classification export trained with `finetune.pooling=mean` (as
`ptray_mean_pooling.py`, named by `auto_map` in its config.json), so plain transformers loads the model with the pooling
it was trained with:

    AutoModelForSequenceClassification.from_pretrained(export_dir, trust_remote_code=True)

Without `trust_remote_code=True` transformers loads the same weights into its own class, which reads one token (GPT-2 /
Llama: the last, BERT: the first) and so predicts differently. This file imports nothing from ptray.
"""

import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, GPT2ForSequenceClassification, LlamaForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the final hidden states over the non-pad tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def _output(logits: torch.Tensor, labels: torch.Tensor | None) -> SequenceClassifierOutput:
    return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


class MeanPooledGPT2ForSequenceClassification(GPT2ForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return _output(self.score(mean_pool(hidden, mask)), labels)


class MeanPooledLlamaForSequenceClassification(LlamaForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return _output(self.score(mean_pool(hidden, mask)), labels)


class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        # BERT's head reads its pooler (dense + tanh) of one vector: here the mean instead of the first token's.
        pooled = self.bert.pooler(mean_pool(hidden, mask)[:, None])
        return _output(self.classifier(self.dropout(pooled)), labels)


CLASSES = {"gpt2": MeanPooledGPT2ForSequenceClassification, "llama": MeanPooledLlamaForSequenceClassification,
           "bert": MeanPooledBertForSequenceClassification}
