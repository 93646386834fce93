"""ptray: pretrain language models on Ray (Ray Data -> Ray Train x DeepSpeed ZeRO -> Hugging Face export)."""

__version__ = "0.1.0"
