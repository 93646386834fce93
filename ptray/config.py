"""Typed configuration: one dataclass per section, loaded from YAML, with dotted `key=value` overrides.

    cfg = load_config("tiny", ["pretrain.max_steps=50", "data.train_files=[a.txt,b/*.jsonl]"])

A config is a built-in name (`ptray/configs/NAME.yaml`) or a path to a YAML file.
Every override value is parsed as YAML.
Unknown keys and invalid values raise `ConfigError` naming the key and the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ptray import storage
from ptray.errors import ConfigError
from ptray.trackers import LOGGERS

BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name; re-running with the same name (and dir) resumes from the latest checkpoint."""
    dir: str = ""
    """Run directory for config.yaml, metrics.jsonl, export/ and (unless run.storage_path is set) checkpoints. Empty:
    `runs/<name>`. On a multi-node cluster it must be on storage every node mounts (rank 0 may run on any node)."""
    storage_path: str = ""
    """Where pretraining checkpoints go: a shared directory or an object-store URI (s3://bucket/prefix). Empty:
    `<run.dir>`. Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), never the URI."""
    seed: int = 0
    """Seeds model init, data shuffling, masking and the validation split."""
    loggers: list[str] = field(default_factory=list)
    """Experiment trackers that get every metrics.jsonl row too, with the config as parameters: any of tensorboard
    (<run.dir>/tensorboard/), mlflow, wandb (offline unless WANDB_API_KEY is set). Needs pip install ptray[trackers]."""
    mlflow_uri: str = ""
    """MLflow tracking URI (http://host:5000, a database or a directory). Empty: $MLFLOW_TRACKING_URI, else
    <run.dir>/mlruns."""


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster address. Empty: $RAY_ADDRESS if set, else a local in-process Ray on this machine."""
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL between them. False: CPU workers over gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (also its torch thread count on CPU)."""
    placement_strategy: str = "PACK"
    """Placement group strategy for the workers: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    max_failures: int = 0
    """Restarts of the workers from the latest checkpoint after a failure once training has started (a killed worker,
    a lost node); -1: unlimited. An error raised before the first optimizer step (an import, an op build, a config or
    shape error) would only repeat: it stops the run at once, whatever this says."""
    wait_for_nodes_s: float = 0.0
    """How long to wait for an autoscaling cluster to grow until the workers fit; 0: fail at once if they cannot."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["builtin"])
    """Corpus files: paths, globs or URIs (s3://, gs://) of .txt, .jsonl or .parquet. `builtin`: the generated
    corpus."""
    sources: list[dict] = field(default_factory=list)
    """A weighted mixture instead of train_files: [{name: web, files: [...], weight: 0.7}, {files: [...], weight:
    0.3}]. Each source is cleaned, deduplicated and packed on its own; training draws its rows in these proportions
    over any window of steps, deterministically and exactly resumable (data.ingest=shards)."""
    text_field: str = "text"
    """Field (.jsonl) or column (.parquet) holding the document text."""
    txt_document: str = "auto"
    """What one document is in a .txt file. line: each non-empty line. paragraph: each run of non-blank lines, its
    lines joined by spaces (hard-wrapped prose: books, READMEs). file: the whole file, as it is (a folder of one
    document per file). auto: paragraph in a file that looks hard-wrapped (paragraphs of several lines between blank
    lines, the lines filled to about one width), line in any other."""
    prepared_dir: str = ""
    """Where `prepare` writes token shards, manifest and tokenizer. Empty: `<run.dir>/data`, which must match this
    config's data settings on a rerun (a change is refused, naming it); a directory given here is used as prepared."""
    normalize_unicode: bool = True
    """Apply Unicode NFKC normalization."""
    strip_html: bool = True
    """Remove the tags of real HTML elements (and comments) and then unescape entities; other text with < and > (code,
    maths) is kept as it is."""
    collapse_whitespace: bool = True
    """Collapse runs of spaces and tabs to one space and trim; line breaks are kept, blank-line runs become one
    paragraph break."""
    min_chars: int = 20
    """Drop documents shorter than this after cleaning (0 keeps all non-empty ones)."""
    max_bad_fraction: float = 0.01
    """JSONL/Parquet records whose text field is missing, null or not a string are skipped and counted; prepare stops
    when more than this fraction of all records are such (0: any one stops it)."""
    dedup: str = "exact"
    """exact: drop documents equal after cleaning (a hash-partitioned shuffle, so no node holds all hashes);
    minhash: near-duplicates too (MinHash + LSH over word shingles, data.minhash_*; `prepare` only); none: keep all."""
    minhash_threshold: float = 0.8
    """data.dedup=minhash: the estimated Jaccard similarity of word shingles at which two documents are near-duplicates
    (each cluster keeps one)."""
    minhash_shingle: int = 5
    """data.dedup=minhash: words per shingle."""
    minhash_permutations: int = 128
    """data.dedup=minhash: hash functions per MinHash signature (more: a closer similarity estimate, slower)."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation, chosen by document hash."""
    seq_len: int = 128
    """Tokens a model sees per row; rows are packed to exactly seq_len + 1 tokens."""
    tokenizer_path: str = ""
    """Local Hugging Face tokenizer directory. Empty: train a byte-level BPE on the corpus."""
    vocab_size: int = 4096
    """Vocabulary size of the trained BPE tokenizer."""
    tokenizer_train_docs: int = 200_000
    """At most this many training documents are streamed into BPE training."""
    rows_per_shard: int = 8192
    """Packed rows per Parquet shard (the last shard from each file of up to 50,000 documents is smaller)."""
    rows_per_group: int = 256
    """Packed rows per Parquet row group: the unit the training reader reads (resume reads one)."""
    shuffle_window_rows: int = 16384
    """Pretraining reads the row groups in a seeded random order and shuffles rows within windows of this many rows,
    so every global batch mixes text from across the corpus. Each worker holds one window of rows in memory."""
    builtin_docs: int = 20_000
    """Documents in the built-in generated corpus."""
    ingest: str = "shards"
    """How training rows reach the workers. shards: from the token shards `ptray prepare` wrote (a bitwise-identical
    order on any world size). ray_data: streamed from the corpus files through Ray Data while the workers train, with
    no prepare pass (each row trained exactly once per epoch, across resumes; the order may differ)."""
    document_masking: bool = False
    """Causal pretraining: the documents packed into a row do not see each other. Position ids restart after each
    end-of-document token and attention stays within a document (transformers builds the block-diagonal mask from
    the position ids). The prepared data is the same either way."""


@dataclass
class ModelConfig:
    family: str = "gpt2"
    """gpt2 or llama (causal LM), or bert (masked LM)."""
    num_layers: int = 2
    """Transformer blocks."""
    hidden_size: int = 64
    """Model width."""
    num_heads: int = 4
    """Attention heads; must divide hidden_size."""
    num_kv_heads: int = 0
    """Llama grouped-query attention heads. 0: same as num_heads."""
    intermediate_size: int = 0
    """MLP width. 0: 4 x hidden_size (gpt2, bert) or the Llama 8/3 rule rounded to 64."""
    max_positions: int = 256
    """Positions the model supports; must be >= data.seq_len."""
    vocab_size: int = 0
    """Embedding rows. 0: the tokenizer's vocabulary rounded up to a multiple of 64."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals (0 is usual for pretraining)."""
    tie_embeddings: bool = True
    """Share input embedding and output head weights."""
    rope_theta: float = 10000.0
    """Llama rotary embedding base."""
    init_from: str = ""
    """Local Hugging Face model directory to start from instead of random init."""
    attention: str = "sdpa"
    """Attention kernel: sdpa (PyTorch's fused scaled-dot-product attention), eager (plain matmul and softmax), or
    flash_attention_2 (GPUs, with the flash-attn package installed)."""
    compile: bool = False
    """torch.compile the model (DeepSpeed's engine.compile) in every stage: fused kernels, about 2x a GPT-2 step on
    a GPU; the first steps pay the compilation (a minute or more). Falls back to eager, with one warning, where the
    platform cannot compile (no Triton on a GPU, no C++ compiler on CPU)."""


@dataclass
class PretrainConfig:
    objective: str = "clm"
    """clm (next-token prediction) or mlm (BERT masked LM: 15% masked, 80/10/10)."""
    max_steps: int = 200
    """Optimizer steps."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all workers; = num_workers x micro_batch_size x grad accumulation."""
    micro_batch_size: int = 4
    """Sequences per worker per forward pass."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr, in optimizer steps. 0: pretrain.warmup_ratio decides."""
    warmup_ratio: float = 0.05
    """Warm-up as a fraction of max_steps, used when warmup_steps is 0, so that it follows a max_steps override.
    Both 0: no warm-up."""
    schedule: str = "cosine"
    """cosine, wsd (warmup-stable-decay) or constant (after warmup)."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Max global gradient norm (0: off)."""
    mlm_probability: float = 0.15
    """mlm: fraction of tokens chosen as targets."""
    activation_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    eval_every: int = 50
    """Steps between validation passes (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per worker in a validation pass."""
    log_every: int = 10
    """Steps between metrics.jsonl rows and progress lines."""
    ckpt_every: int = 100
    """Steps between checkpoints (a final one is always written)."""
    num_to_keep: int = 2
    """Checkpoints kept; older ones are deleted."""
    max_nonfinite_steps: int = 3
    """A step whose loss is NaN/inf on any worker is skipped (no update); after this many in a row training stops with
    an error, keeping the last good checkpoint (finetuning too)."""
    peak_flops_per_worker: float = 0.0
    """Peak FLOP/s of one worker's device for MFU. 0: a known GPU's bf16 peak, or a measured matmul peak on CPU."""
    profile_steps: int = 0
    """Profile this many optimizer steps with torch.profiler on rank 0, from the 10th step of the run on (after
    warm-up and compilation): `<run.dir>/profile/` gets `trace.json` (open in Perfetto or chrome://tracing) and
    `top_ops.txt` (operators by device time on GPUs, CPU time on CPU; `aten::_local_scalar_dense` counts host syncs).
    0: off."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    """ZeRO stage: 0 (DDP), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (loss-scaled). bf16 keeps fp32 master weights and, with ZeRO stages 1-3, accumulates gradients
    in fp32 (DeepSpeed's data_types.grad_accum_dtype)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (stages 1-3)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (stage 3 only)."""
    torch_adam: bool = True
    """AdamW from torch (on GPUs its fused kernel, which needs no build at start) rather than DeepSpeed's fused Adam
    (false: GPUs only; JIT-built at the first step for the GPU present, about 45 s)."""


@dataclass
class FinetuneConfig:
    task: str = "classification"
    """classification (sequence-classification head), sft (prompt/response, loss on response tokens only) or chat
    (conversations as role/content messages rendered with the tokenizer's chat template, loss on assistant turns)."""
    pretrained: str = ""
    """Local Hugging Face model directory to start from. Empty: this run's pretraining export, `<run.dir>/export`."""
    init: str = "pretrained"
    """pretrained (start from the weights) or scratch (same architecture, random weights: the baseline)."""
    train_files: list[str] = field(default_factory=lambda: ["builtin"])
    """Labelled .jsonl/.csv/.parquet files (paths, globs, URIs). `builtin`: the generated task for the built-in
    corpus."""
    val_files: list[str] = field(default_factory=list)
    """Labelled validation files. Empty: hold out val_fraction of train_files by content hash."""
    val_fraction: float = 0.2
    """Held-out share of train_files (by content hash) when val_files is empty."""
    group_field: str = ""
    """Hold out whole groups by this field's value (an author, a user, a source document) rather than single
    examples, so related examples never straddle the train/validation split. The built-in tasks group by word
    (classification) or person (sft, chat)."""
    text_field: str = "text"
    """classification: the text field."""
    label_field: str = "label"
    """classification: the label field (strings or integers; strings are mapped to ids saved with the model)."""
    prompt_field: str = "prompt"
    """sft: the prompt field."""
    response_field: str = "response"
    """sft: the response field."""
    messages_field: str = "messages"
    """chat: the field holding a conversation, a list of {"role": system|user|assistant, "content": text}."""
    max_len: int = 64
    """Tokens per example: longer ones are cut to it. A batch is padded only to its longest example (in training, the
    longest of its global batch), so a generous max_len costs nothing for short texts. When it cuts more than 5% of the
    training examples, the log and the report say how many and the lengths that would keep half and 95% of them
    whole."""
    epochs: int = 3
    """Passes over the labelled training set."""
    lr: float = 1e-3
    """Peak learning rate (linear warmup, cosine decay to 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent in linear warmup (then cosine decay)."""
    global_batch_size: int = 16
    """Examples per optimizer step over all workers."""
    micro_batch_size: int = 8
    """Examples per worker per forward pass."""
    freeze_layers: int = 0
    """Freeze the embeddings and the first k transformer blocks (0: train everything)."""
    train_fraction: float = 1.0
    """Train on this (seeded) fraction of the labelled training set."""
    eval_every: int = 0
    """Steps between evaluations; each is reported to Tune (ASHA decides on these) with a checkpoint. 0: train on
    about as many examples as the validation set holds between two evaluations (so evaluating costs about a quarter
    of the time), and at least 8 evaluations a run."""
    builtin_examples: int = 2000
    """Examples in the built-in labelled task."""
    pooling: str = "mean"
    """classification: what the head reads. mean: the mean of the final hidden states over the non-pad tokens (the
    export loads so with `AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)` or
    `ptray.finetune.load_classifier`; without trust_remote_code transformers reads one token); last: the last non-pad
    token (GPT-2/Llama's own head, plain transformers; on bert the same as cls); cls: the first token (bert only).
    mean is the default: a small or briefly pretrained causal model spreads what it knows of a text over every
    position, and its last token alone is a weak summary (real text, 4-layer GPT-2 pretrained 600 steps, untuned
    finetuning: 0.660 with mean, 0.624 with last; 0.620 either way from scratch)."""
    method: str = "full"
    """full (train every weight), head (only the new classification head; the rest stays as pretrained) or lora
    (LoRA adapters on finetune.lora_targets plus, for classification, the whole head; merged into the export)."""
    lora_rank: int = 8
    """method=lora: rank r of each adapter's update B·A."""
    lora_alpha: float = 16.0
    """method=lora: the update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """method=lora: dropout on the adapters' input."""
    lora_targets: list[str] = field(default_factory=list)
    """method=lora: module-name suffixes to adapt (e.g. [c_attn, c_proj]). Empty: every linear layer of the blocks
    (gpt2: c_attn, c_proj, c_fc; llama: q/k/v/o_proj, gate/up/down_proj; bert: query, key, value, dense)."""
    head_lr: float = 0.0
    """classification: peak learning rate of the newly initialized head (score; bert: pooler and classifier), on the
    same schedule as the rest (LoRA adapters count as the rest). 0: finetune.lr."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (ULMFiT, ELECTRA): the top (final norm and head) trains at finetune.lr, each
    transformer block below it at layer_decay times the rate of the block above, and the embeddings below the first
    block, so the lower layers' pretrained features move least. In (0, 1]; 1: every layer at finetune.lr. With
    finetune.head_lr the head trains at head_lr. An output layer tied to the embeddings (SFT on gpt2) is one tensor
    with them and trains at their rate."""
    label_smoothing: float = 0.0
    """classification: label smoothing of the training cross-entropy (val_loss stays the plain cross-entropy)."""
    lm_weight: float = 0.0
    """classification with gpt2/llama: weight of an auxiliary next-token loss on the training texts, added to the
    classification loss (GPT-1's auxiliary objective: the body keeps modelling the task's text while it learns the
    labels). It reads the final hidden states through the pretrained output layer and is not exported. 0: off."""
    teacher: str = ""
    """sft, chat: a local causal LM directory (same tokenizer) to distill from: the training loss mixes the labels'
    cross-entropy with the KL divergence to the teacher's softened next-token distribution on the same tokens. The
    teacher runs in every worker, without gradients. Empty: no distillation."""
    distill_weight: float = 0.5
    """With finetune.teacher: the share of the distillation term in the loss ((1 - w) x cross-entropy + w x KL)."""
    distill_temperature: float = 2.0
    """With finetune.teacher: the softmax temperature of both distributions (the KL term is scaled by its square)."""
    dropout: float = -1.0
    """Dropout probability for every dropout of the model (gpt2: resid/embd/attn_pdrop, summary_first_dropout; llama:
    attention_dropout; bert: hidden/attention_probs/classifier dropout). -1: keep the pretrained model's."""


@dataclass
class SweepConfig:
    space: dict = field(default_factory=lambda: {"finetune.lr": {"loguniform": [3e-4, 3e-3]},
                                                 "finetune.freeze_layers": {"choice": [0, 1]}})
    """Search space: dotted key -> {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {randint: [lo, hi]}, {choice: [...]}
    or {grid: [...]}."""
    num_samples: int = 6
    """Trials (with grid: samples per grid point)."""
    searcher: str = "random"
    """random, grid (every value of every `grid` key) or optuna (TPE)."""
    scheduler: str = "asha"
    """asha (stop poor trials early at evaluation rungs) or none."""
    metric: str = "val_accuracy"
    """The reported metric to optimize (classification: val_accuracy, val_f1, val_loss; sft, chat: val_loss,
    val_ppl)."""
    mode: str = "max"
    """max or min."""
    grace_period: int = 0
    """ASHA: optimizer steps every trial runs before it can be stopped. 0: a quarter of the longest trial. Never less
    than the longest warm-up (finetune.warmup_ratio x the trial's steps): no trial is judged while still warming up."""
    reduction_factor: int = 2
    """ASHA: keep the best 1/reduction_factor at each rung."""
    max_concurrent: int = 0
    """Trials at once. 0: as many as the cluster's free CPUs/GPUs fit."""
    compare_scratch: bool = False
    """Also search the same space with the same budget from random initialization (best against best), to show
    honestly what pretraining bought; `best/` is then the better model of the two sides."""
    num_seeds: int = 3
    """Each side's winning configuration is run again with this many new seeds, and the verdict compares the means of
    these reruns (their spread tells a real difference from noise). The search trial itself is not counted: picked as
    the best of many runs, it flatters its side. 0: no reruns; the verdict compares the two search winners."""
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    """Fractions of the labelled training set at which each side's winner is also trained, e.g. [0.1, 0.3, 1.0]: the
    curve that shows whether pretraining cuts the labels needed. A fraction f trains epochs / f epochs, about the
    optimizer steps of the full-label run."""
    pretrained_steps: list[float] = field(default_factory=list)
    """Points of pretraining, e.g. [500, 1000] (optimizer steps) or [0.333, 0.667] (fractions of pretrain.max_steps,
    which follow a max_steps override), whose weights pretraining keeps (`<run.dir>/snapshots/step-N/export`) and the
    sweep also finetunes with the pretrained winner's configuration: accuracy against pretraining tokens, which
    answers "was pretraining long enough?". Set it before pretraining."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    # ---- derived values ------------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> str:
        return self.run.dir or os.path.join("runs", self.run.name)

    @property
    def prepared_dir(self) -> str:
        return self.data.prepared_dir or os.path.join(self.run_dir, "data")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "model.family": ("gpt2", "llama", "bert"),
    "model.attention": ("sdpa", "eager", "flash_attention_2"),
    "data.ingest": ("shards", "ray_data"),
    "data.dedup": ("exact", "minhash", "none"),
    "data.txt_document": ("auto", "line", "paragraph", "file"),
    "pretrain.objective": ("clm", "mlm"),
    "pretrain.schedule": ("cosine", "wsd", "constant"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "finetune.task": ("classification", "sft", "chat"),
    "finetune.init": ("pretrained", "scratch"),
    "sweep.searcher": ("random", "grid", "optuna"),
    "sweep.scheduler": ("asha", "none"),
    "sweep.mode": ("max", "min"),
}
# Values older configs may hold, read as what they meant.
LEGACY_VALUES = {"data.dedup": {True: "exact", False: "none"}}
SEARCH_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
# What a sweep trial may change: finetuning hyperparameters and the seed. Not the task, the data files and fields, the
# validation split (trials would be scored on different sets) or the init (sweep.compare_scratch runs both sides).
NOT_SWEEPABLE = ("task", "pretrained", "init", "train_files", "val_files", "val_fraction", "group_field", "text_field",
                 "label_field", "prompt_field", "response_field", "messages_field", "builtin_examples")
SWEEPABLE = ["run.seed"] + [f"finetune.{f.name}" for f in dataclasses.fields(FinetuneConfig)
                            if f.name not in NOT_SWEEPABLE]
DATA_KEYS = ("finetune.max_len", "finetune.train_fraction")  # change the tokenized data a trial sees


# Every numeric key's allowed interval ("[" / "]" include the bound, "(" / ")" exclude it), checked at load time before
# any work starts. For an integer key "(0, inf)" means >= 1.
RANGES = {
    "run.seed": "[0, inf)",
    "cluster.num_workers": "(0, inf)", "cluster.cpus_per_worker": "(0, inf)", "cluster.max_failures": "[-1, inf)",
    "cluster.wait_for_nodes_s": "[0, inf)",
    "data.min_chars": "[0, inf)", "data.max_bad_fraction": "[0, 1]", "data.val_fraction": "[0, 1)",
    "data.seq_len": "(0, inf)",
    "data.vocab_size": "(0, inf)", "data.tokenizer_train_docs": "(0, inf)", "data.rows_per_shard": "(0, inf)",
    "data.rows_per_group": "(0, inf)", "data.shuffle_window_rows": "(0, inf)", "data.builtin_docs": "(0, inf)",
    "data.minhash_threshold": "(0, 1]", "data.minhash_shingle": "(0, inf)", "data.minhash_permutations": "(0, inf)",
    "model.num_layers": "(0, inf)", "model.hidden_size": "(0, inf)", "model.num_heads": "(0, inf)",
    "model.num_kv_heads": "[0, inf)", "model.intermediate_size": "[0, inf)", "model.max_positions": "(0, inf)",
    "model.vocab_size": "[0, inf)", "model.dropout": "[0, 1)", "model.rope_theta": "(0, inf)",
    "pretrain.max_steps": "(0, inf)", "pretrain.global_batch_size": "(0, inf)", "pretrain.micro_batch_size": "(0, inf)",
    "pretrain.lr": "(0, inf)", "pretrain.min_lr_ratio": "[0, 1]", "pretrain.warmup_steps": "[0, inf)",
    "pretrain.warmup_ratio": "[0, 1)",
    "pretrain.decay_fraction": "(0, 1]",
    "pretrain.weight_decay": "[0, inf)", "pretrain.beta1": "[0, 1)", "pretrain.beta2": "[0, 1)",
    "pretrain.grad_clip": "[0, inf)", "pretrain.mlm_probability": "(0, 1)", "pretrain.eval_every": "[0, inf)",
    "pretrain.eval_batches": "(0, inf)", "pretrain.log_every": "(0, inf)", "pretrain.ckpt_every": "(0, inf)",
    "pretrain.num_to_keep": "(0, inf)", "pretrain.max_nonfinite_steps": "(0, inf)",
    "pretrain.peak_flops_per_worker": "[0, inf)", "pretrain.profile_steps": "[0, inf)",
    "finetune.val_fraction": "(0, 1)", "finetune.max_len": "(0, inf)", "finetune.epochs": "(0, inf)",
    "finetune.lr": "(0, inf)", "finetune.weight_decay": "[0, inf)", "finetune.warmup_ratio": "[0, 1)",
    "finetune.global_batch_size": "(0, inf)", "finetune.micro_batch_size": "(0, inf)",
    "finetune.freeze_layers": "[0, inf)", "finetune.train_fraction": "(0, 1]", "finetune.eval_every": "[0, inf)",
    "finetune.builtin_examples": "(0, inf)", "finetune.lora_rank": "(0, inf)", "finetune.lora_alpha": "(0, inf)",
    "finetune.lora_dropout": "[0, 1)", "finetune.head_lr": "[0, inf)", "finetune.label_smoothing": "[0, 1)",
    "finetune.lm_weight": "[0, inf)", "finetune.layer_decay": "(0, 1]",
    "finetune.distill_weight": "[0, 1]", "finetune.distill_temperature": "(0, inf)",
    "sweep.num_samples": "(0, inf)", "sweep.grace_period": "[0, inf)", "sweep.reduction_factor": "[2, inf)",
    "sweep.max_concurrent": "[0, inf)", "sweep.num_seeds": "[0, inf)",
}


def _in_interval(value: float, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above_low = low <= value if interval[0] == "[" else low < value
    return above_low and (value <= high if interval[-1] == "]" else value < high)


def cluster_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray cluster address (host:port, default port 6379; ray://host, default 10001); None for
    `auto` and `local`, which ray.init resolves itself. ConfigError for a dashboard URL or a port out of range."""
    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r} is a dashboard / job-submission URL. ptray connects to the cluster "
                          "itself: use host:6379 (or ray://host:10001), or submit the job with "
                          f"`ray job submit --address {address} ...`.")
    parsed = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parsed.port or (10001 if address.startswith("ray://") else 6379)
    except ValueError as e:  # e.g. a port above 65535
        raise ConfigError(f"--address / cluster.address {address!r} is not a valid host:port ({e}); the head's GCS "
                          "listens on host:6379 by default (Ray Client: ray://host:10001).") from None
    if not parsed.hostname:
        raise ConfigError(f"--address / cluster.address {address!r} names no host; use host:6379 or ray://host:10001.")
    return parsed.hostname, port


def source_names(sources: list[dict]) -> list[str]:
    return [str(source.get("name") or f"source{i}") for i, source in enumerate(sources)]


def check_sources(cfg: Config) -> None:
    """data.sources: each a mapping with files and a weight; weights not negative and not all zero."""
    d = cfg.data
    if d.train_files != ["builtin"]:
        raise ConfigError("data.sources and data.train_files are both set; a mixture names its files in its sources: "
                          "remove data.train_files (or data.sources).")
    if d.ingest != "shards":
        raise ConfigError("data.sources needs data.ingest=shards: a mixture's proportions are kept by the prepared "
                          "shards' reader; set data.ingest=shards or use data.train_files.")
    example = "data.sources=[{name: web, files: [web/*.jsonl], weight: 0.7}, {files: [books/*.txt], weight: 0.3}]"
    for i, source in enumerate(d.sources):
        unknown = set(source) - {"name", "files", "weight"}
        if unknown:
            raise ConfigError(f"data.sources[{i}] has unknown key(s) {sorted(unknown)}; a source has name, files and "
                              f"weight, e.g. {example}.")
        files = source.get("files")
        if isinstance(files, str):
            files = source["files"] = [files]
        if not files or not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise ConfigError(f"data.sources[{i}] has no files; give each source its corpus paths or globs, e.g. "
                              f"{example}.")
        for f in files:
            storage.check_uri(f, f"data.sources[{i}].files")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"data.sources[{i}].weight must be a number >= 0, got {weight!r}.")
    if sum(float(source.get("weight", 1.0)) for source in d.sources) <= 0:
        raise ConfigError("data.sources' weights sum to 0; give at least one source a positive weight.")
    names = source_names(d.sources)
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources has repeated names {names}; give each source its own name.")


def validate(cfg: Config) -> Config:
    """Check values and cross-field rules; raise ConfigError with the key and the fix."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, allowed))}.")
    for key, interval in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not _in_interval(value, interval):
            low, high = interval[1:-1].split(", ")
            allowed = f"{'>=' if interval[0] == '[' else '>'} {low}" if high == "inf" else f"in {interval}"
            raise ConfigError(f"{key} must be {allowed}, got {value!r}.")
    for name in cfg.run.loggers:
        if name not in LOGGERS:
            raise ConfigError(f"run.loggers has {name!r}, which is not a tracker ptray knows; choose from "
                              f"{', '.join(LOGGERS)} (e.g. run.loggers=[tensorboard,mlflow]).")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty; give corpus paths or globs, e.g. "
                          "data.train_files=[corpus/*.txt].")
    if cfg.data.sources:
        check_sources(cfg)
    for key, path in [("run.storage_path", cfg.run.storage_path), ("data.prepared_dir", cfg.data.prepared_dir),
                      *[("data.train_files", f) for f in cfg.data.train_files]]:
        storage.check_uri(path, key)
    if cfg.cluster.address:
        cluster_host_port(cfg.cluster.address)  # a malformed address or port is a config error, not a hang
    if os.path.exists(cfg.run.dir) and not os.path.isdir(cfg.run.dir):
        raise ConfigError(f"run.dir={cfg.run.dir!r} is a file, not a directory; choose another run.dir.")
    if storage.is_uri(cfg.run.dir):
        raise ConfigError(f"run.dir={cfg.run.dir!r} must be a local or mounted directory (it holds logs and the "
                          "export); put checkpoints in object storage with run.storage_path=s3://... instead.")
    p = cfg.pretrain
    per_step = cfg.cluster.num_workers * p.micro_batch_size
    if p.global_batch_size % per_step:
        raise ConfigError(
            f"pretrain.global_batch_size={p.global_batch_size} is not divisible by cluster.num_workers x "
            f"pretrain.micro_batch_size = {cfg.cluster.num_workers} x {p.micro_batch_size} = {per_step}; "
            f"use a multiple of {per_step}, e.g. "
            f"pretrain.global_batch_size={per_step * max(1, round(p.global_batch_size / per_step))}.")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.model.hidden_size} must be divisible by "
                          f"model.num_heads={cfg.model.num_heads}.")
    if cfg.model.num_kv_heads and cfg.model.num_heads % cfg.model.num_kv_heads:
        raise ConfigError(f"model.num_heads={cfg.model.num_heads} must be divisible by "
                          f"model.num_kv_heads={cfg.model.num_kv_heads}.")
    if cfg.data.seq_len > cfg.model.max_positions and not cfg.model.init_from:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_positions={cfg.model.max_positions}; "
            f"lower data.seq_len or raise model.max_positions to at least {cfg.data.seq_len}.")
    if (cfg.pretrain.objective == "mlm") != (cfg.model.family == "bert"):
        raise ConfigError(
            f"pretrain.objective={cfg.pretrain.objective!r} does not fit model.family={cfg.model.family!r}: "
            "use objective mlm with family bert, and objective clm with gpt2 or llama.")
    if cfg.data.dedup == "minhash" and cfg.data.ingest == "ray_data":
        raise ConfigError("data.dedup=minhash needs data.ingest=shards: near-duplicates are found over the whole "
                          "corpus before training, which a streamed corpus never is; use data.dedup=exact when "
                          "streaming.")
    if cfg.data.document_masking and cfg.pretrain.objective != "clm":
        raise ConfigError("data.document_masking=true needs causal pretraining (pretrain.objective=clm, model.family "
                          "gpt2 or llama): transformers builds a per-document mask only for causal attention; "
                          "set data.document_masking=false for bert.")
    if cfg.model.attention == "flash_attention_2" and not cfg.cluster.use_gpu:
        raise ConfigError("model.attention=flash_attention_2 runs on GPUs only; on CPU workers use sdpa or eager.")
    if cfg.model.vocab_size and cfg.model.vocab_size < 8:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is too small; use 0 to size it from the tokenizer.")
    ds = cfg.deepspeed
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3.")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1.")
    if not ds.torch_adam and not cfg.cluster.use_gpu:
        raise ConfigError("deepspeed.torch_adam=false selects DeepSpeed's fused Adam, a CUDA kernel; on CPU workers "
                          "(cluster.use_gpu=false) set deepspeed.torch_adam=true.")
    if ds.precision == "fp16" and not cfg.cluster.use_gpu:
        raise ConfigError("deepspeed.precision=fp16 needs GPUs (cluster.use_gpu=true); use bf16 or fp32 on CPU.")
    ft = cfg.finetune
    if ft.global_batch_size % (cfg.cluster.num_workers * ft.micro_batch_size):
        raise ConfigError(
            f"finetune.global_batch_size={ft.global_batch_size} is not divisible by cluster.num_workers x "
            f"finetune.micro_batch_size = {cfg.cluster.num_workers * ft.micro_batch_size}.")
    for key, allowed in (("pooling", ("last", "mean", "cls")), ("method", ("full", "head", "lora"))):
        if getattr(ft, key) not in allowed:
            raise ConfigError(f"finetune.{key}={getattr(ft, key)!r} is not valid; choose one of {', '.join(allowed)}.")
    if not all(isinstance(t, str) and t.strip(".") for t in ft.lora_targets):
        raise ConfigError(f"finetune.lora_targets={ft.lora_targets} must be module-name suffixes such as c_attn or "
                          "attn.c_proj ([] for the family's defaults).")
    if ft.dropout != -1 and not 0 <= ft.dropout < 1:
        raise ConfigError(f"finetune.dropout must be in [0, 1), or -1 to keep the pretrained model's, got "
                          f"{ft.dropout}.")
    if ft.teacher and ft.task == "classification":
        raise ConfigError("finetune.teacher distills a causal LM's next-token distribution, which a classification "
                          "head does not have; use it with finetune.task=sft or chat, or leave finetune.teacher empty.")
    if ft.lm_weight and ft.method == "head":
        raise ConfigError("finetune.lm_weight trains the pretrained body on the task's text, which "
                          "finetune.method=head keeps frozen; use method=full or lora with it, or set "
                          "finetune.lm_weight=0.")
    if ft.task in ("sft", "chat"):  # these act on the classification head, which a language model has none of
        for key, neutral in (("pooling", "mean"), ("head_lr", 0.0), ("label_smoothing", 0.0), ("lm_weight", 0.0)):
            if getattr(ft, key) != neutral:
                raise ConfigError(f"finetune.{key}={getattr(ft, key)!r} applies to finetune.task=classification only; "
                                  f"with task={ft.task} leave it at {neutral!r}.")
        if ft.method == "head":
            raise ConfigError(f"finetune.method=head trains only a new classification head, which finetune.task="
                              f"{ft.task} does not have (its output layer is pretrained); use method=full or "
                              "method=lora.")
    validate_space(cfg.sweep.space)
    for fraction in cfg.sweep.label_fractions:
        if not 0 < fraction <= 1:
            raise ConfigError(f"sweep.label_fractions holds {fraction}; each fraction of the labelled training set "
                              "must be in (0, 1], e.g. sweep.label_fractions=[0.1,0.3,1.0].")
    for point in cfg.sweep.pretrained_steps:
        if not (0 < point < 1 or (point >= 1 and point.is_integer())):
            raise ConfigError(f"sweep.pretrained_steps holds {point:g}; give optimizer steps of pretraining (whole "
                              "numbers >= 1) or fractions of pretrain.max_steps in (0, 1), e.g. [0.333, 0.667].")
    return cfg


def validate_space(space: dict) -> None:
    """A sweep space maps config keys to one search distribution each; ConfigError names the bad entry."""
    if not space:
        raise ConfigError("sweep.space is empty; give at least one key, e.g. "
                          "sweep.space={finetune.lr: {loguniform: [1e-4, 1e-2]}}.")
    valid = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)]
    for key, spec in space.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), SWEEPABLE, n=1, cutoff=0.5)
            raise ConfigError(f"sweep.space key {key!r} is not a config key" +
                              (f"; did you mean {close[0]!r}?" if close else "."))
        if key not in SWEEPABLE:
            raise ConfigError(f"sweep.space key {key!r} is not something a finetuning trial can change (the model's "
                              "shape comes from the pretrained export; data files, fields, task and validation split "
                              "are fixed so trials are scored alike; sweep.compare_scratch runs the scratch side). "
                              f"Sweepable keys: {', '.join(SWEEPABLE)}.")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(f"sweep.space[{key!r}] must be one of {{kind: values}} with kind in "
                              f"{', '.join(SEARCH_KINDS)}, got {spec!r}.")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.space[{key!r}].{kind} needs a non-empty list, got {values!r}.")
        if key in DATA_KEYS and kind not in ("choice", "grid"):
            raise ConfigError(f"sweep.space[{key!r}] changes the data a trial trains on, which is tokenized once per "
                              f"value: give a list of values, e.g. {{choice: [...]}} or {{grid: [...]}}, not {kind}.")
        if kind in ("loguniform", "uniform", "randint") and len(values) != 2:
            raise ConfigError(f"sweep.space[{key!r}].{kind} needs [low, high], got {values!r}.")
        if kind in ("loguniform", "uniform"):
            try:
                low, high = (float(v) for v in values)
            except (TypeError, ValueError):
                raise ConfigError(f"sweep.space[{key!r}].{kind} needs numbers, got {values!r}.") from None
            if not (0 < low < high if kind == "loguniform" else low < high):
                raise ConfigError(f"sweep.space[{key!r}].{kind} needs 0 < low < high (log) or low < high, "
                                  f"got {values!r}.")


# ---- loading and overrides ---------------------------------------------------------------------------------------


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a built-in config by name or a YAML file by path, apply `key=value` overrides, validate."""
    path = Path(name_or_path)
    if not path.suffix and (BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml").exists():
        path = BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(name_or_path, builtin_config_names(), n=1)
        raise ConfigError(
            f"config {name_or_path!r} is neither a built-in config nor a YAML file. Built-in configs: "
            f"{', '.join(builtin_config_names())}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + ".")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (run:, data:, ...), got {type(raw).__name__}.")
    return load_config_dict(raw, overrides, source=str(path))


def space_values(spec: dict) -> list:
    """The values a search distribution can give that bound what a trial does: every choice or grid value, every
    integer of a randint, both ends of a (log)uniform range."""
    kind, values = next(iter(spec.items()))
    if kind == "randint":
        return list(range(values[0], values[1] + 1))
    if kind in ("loguniform", "uniform"):
        return [float(v) for v in values]  # YAML 1.1 reads `1e-4` as a string
    return list(values)


def check_space_values(cfg: Config, check_trial: typing.Callable[[Config], None] | None = None) -> None:
    """Every value sweep.space can give a trial (`space_values`, one key at a time) must make a valid config, and
    pass `check_trial` on it (the sweep checks it against the pretrained model); ConfigError names the first that
    does not. `ptray pipeline` runs this before pretraining, the sweep before any trial. Not at load: `ptray
    finetune` with another task must not fail over a sweep it does not run."""
    base = cfg.to_dict()
    for key, spec in cfg.sweep.space.items():
        for value in space_values(spec):
            try:
                trial = trial_config(base, {key: value})
                if check_trial:
                    check_trial(trial)
            except ConfigError as e:
                raise ConfigError(f"sweep.space gives {key}={value!r}, which no trial can run: {e}") from None


def trial_config(base: dict, overrides: dict) -> Config:
    """The base config (as a dict) with a trial's sampled dotted overrides applied and validated."""
    return load_config_dict(base, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def load_config_dict(raw: dict, overrides: typing.Sequence[str] = (), source: str = "config") -> Config:
    """A Config from nested dicts (e.g. `Config.to_dict()`) plus `key=value` overrides, validated."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. pretrain.max_steps=50.")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed)
    return validate(from_dict(raw, source=source))


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section.")
    node[parts[-1]] = value


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from nested dicts, checking every key and value type."""
    sections = {}
    for section_name, section_raw in raw.items():
        section_field = _field(Config, section_name, prefix="")
        if section_raw is None:
            section_raw = {}
        if not isinstance(section_raw, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping, got {section_raw!r}.")
        cls = section_field.default_factory
        values = {}
        for key, value in section_raw.items():
            _field(cls, key, prefix=section_name + ".")  # raises on unknown keys
            value = LEGACY_VALUES.get(f"{section_name}.{key}", {}).get(value, value) if isinstance(value, bool) \
                else value
            values[key] = _coerce(value, typing.get_type_hints(cls)[key], f"{section_name}.{key}")
        sections[section_name] = cls(**values)
    return Config(**sections)


def _field(cls, name: str, prefix: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        valid = [prefix + n for n in fields]
        close = difflib.get_close_matches(prefix + str(name), valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
        raise ConfigError(f"unknown config key {prefix + str(name)!r}.{hint}")
    return fields[name]


def _coerce(value, annotation, key: str):
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `data.train_files=a.txt` means a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}.")
        return value
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("config fields are not Optional; give them a real default")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}.")
        return str(value)
    raise AssertionError(f"unsupported config type {annotation} for {key}")


def save_config(cfg: Config, run_dir: str) -> str:
    """Write the resolved config to `<run_dir>/config.yaml` atomically; returns the path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(cfg.to_yaml())
    os.replace(tmp, path)
    return path


def with_absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute: Ray workers and Tune trials run in other working directories than the driver."""
    absolute = storage.absolute
    cfg = resolved(cfg)
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=absolute(cfg.run.dir), storage_path=absolute(cfg.run.storage_path)),
        data=dataclasses.replace(cfg.data, prepared_dir=absolute(cfg.data.prepared_dir),
                                 tokenizer_path=absolute(cfg.data.tokenizer_path)),
        model=dataclasses.replace(cfg.model, init_from=absolute(cfg.model.init_from)),
        finetune=dataclasses.replace(cfg.finetune, pretrained=absolute(cfg.finetune.pretrained)))


def resolved(cfg: Config) -> Config:
    """Fill derived paths (run.dir, data.prepared_dir) so the printed/saved config is explicit."""
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=cfg.run_dir),
                              data=dataclasses.replace(cfg.data, prepared_dir=cfg.prepared_dir))
    return cfg


def snapshot_steps(cfg: Config) -> list[int]:
    """sweep.pretrained_steps as optimizer steps: a fraction f is round(f x pretrain.max_steps), kept inside the
    run (steps 1 to max_steps - 1; the final step is always finetuned)."""
    max_steps = cfg.pretrain.max_steps
    steps = {int(p) if p >= 1 else min(max(round(p * max_steps), 1), max_steps - 1) for p in cfg.sweep.pretrained_steps}
    return sorted(step for step in steps if step >= 1)


def check_pretrained_steps(cfg: Config) -> None:
    """Before a pipeline pretrains: every step in sweep.pretrained_steps must fall inside pretraining (checked here,
    not at load, so shortening pretraining for a `ptray pretrain` alone needs no other change; fractions always do)."""
    max_steps = cfg.pretrain.max_steps
    for step in (int(p) for p in cfg.sweep.pretrained_steps if p >= 1):
        if not 0 < step < max_steps:
            raise ConfigError(f"sweep.pretrained_steps holds {step}, but pretraining runs steps 1-{max_steps} (the "
                              f"final step is always finetuned); give steps in 1-{max_steps - 1}, fractions "
                              "of the run such as [0.333, 0.667], or sweep.pretrained_steps=[] to finetune from the "
                              "final model only.")


def reference_tables() -> str:
    """The README's configuration reference (`ptray config docs`): one Markdown table per section, from the defaults
    and the field docstrings above, so the README cannot drift from the code."""
    import ast

    docs = {}
    for node in ast.parse(Path(__file__).read_text()).body:
        if isinstance(node, ast.ClassDef):
            for stmt, after in zip(node.body, node.body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                        and isinstance(after.value, ast.Constant)):
                    docs[(node.name, stmt.target.id)] = " ".join(after.value.value.split())
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        lines += [f"**`{section.name}`**", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if isinstance(value, dict) and value:
                shown = "(see tiny.yaml)"
            elif isinstance(value, list):
                shown = "[" + ", ".join(map(str, value)) + "]"
            else:
                shown = '""' if value == "" else str(value)
            doc = docs.get((cls.__name__, f.name), "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | `{shown}` | {doc} |")
        lines.append("")
    return "\n".join(lines)
