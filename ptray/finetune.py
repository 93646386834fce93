"""`ptray finetune`: classification or SFT on a pretrained export, as a Ray Train run with DeepSpeed.

    ptray finetune --config tiny                                   # the built-in task on runs/tiny/export
    ptray finetune --config tiny finetune.task=sft finetune.lr=3e-3
    ptray finetune --config tiny finetune.pretrained=/models/gpt2-local finetune.train_files=[data/train.jsonl]

The labelled set is read and tokenized once on the driver and put in the Ray object store; every worker (and every
sweep trial) reads it from there. Training runs through the same loop as pretraining (`loop.fit`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput
from transformers.pytorch_utils import Conv1D

from ptray import checkpoint as ckpt
from ptray import hf_mean_pooling
from ptray.config import Config, from_dict, save_config, with_absolute_paths
from ptray.data.builtin import generate_labelled
from ptray.data.clean import doc_hash, is_validation
from ptray.data.readers import expand_files, has_format
from ptray.data.tokenizer import load_tokenizer, tokenizer_hash
from ptray.errors import ConfigError, DataError
from ptray.loop import fit, raise_if_stopped, setup_worker, to_device, worker_entry
from ptray.model import check_attention, flops_per_token
from ptray.objectives import IGNORE_INDEX
from ptray.schedule import Schedule
from ptray.session import fit_with_retries
from ptray.storage import filesystem_for
from ptray.trial import build_trainer, pretrained_dir

METRICS = {"classification": ("val_loss", "val_accuracy", "val_f1"), "sft": ("val_loss", "val_ppl"),
           "chat": ("val_loss", "val_ppl")}


# ---- labelled data (driver) ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class LabelledData:
    """Tokenized examples, padded to max_len: what every worker and trial reads from the object store."""
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    id2label: dict[int, str]
    cut_note: str = ""  # what finetune.max_len cuts off the training examples, when it is a real share (else "")


def read_labelled_rows(patterns: list[str], cfg: Config) -> list[dict]:
    """Rows of .jsonl/.csv/.parquet labelled files (`builtin`: the generated task)."""
    if patterns == ["builtin"]:
        return generate_labelled(cfg.finetune.builtin_examples, cfg.finetune.task, seed=cfg.run.seed)
    rows = []
    for f in expand_files(patterns, "finetune.train_files / val_files", (".jsonl", ".json", ".csv", ".parquet"),
                          "labelled/train.jsonl"):
        fs, path = filesystem_for(f)
        parquet = has_format(f, (".parquet",))
        try:  # a stream decompresses .jsonl.gz, .csv.zst and the like (see readers.COMPRESSED_EXTENSIONS)
            with fs.open_input_file(path) if parquet else fs.open_input_stream(path) as handle:
                if parquet:
                    rows += pq.read_table(handle).to_pylist()
                elif has_format(f, (".csv",)):
                    rows += pacsv.read_csv(handle).to_pylist()
                else:  # parsed per line: Arrow's reader rejects a file whose field changes type between records
                    for number, line in enumerate(handle.read().decode("utf-8").splitlines(), 1):
                        if line.strip():
                            try:
                                rows.append(json.loads(line))
                            except json.JSONDecodeError as e:
                                raise DataError(f"labelled file {f} line {number} is not JSON ({e.msg}).") from None
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read labelled file {f}: {e}. Use .jsonl, .csv or .parquet.") from None
    if any(not isinstance(r, dict) for r in rows):
        raise DataError(f"the labelled files {patterns} hold records that are not JSON objects; each line must be one "
                        "object with the text and label fields.")
    return rows


def load_labelled(cfg: Config, tokenizer) -> LabelledData:
    """Read, check, split, subsample and tokenize the labelled data (small: it fits the driver)."""
    ft = cfg.finetune
    rows = read_labelled_rows(ft.train_files, cfg)
    if not rows:
        raise DataError(f"finetune.train_files={ft.train_files} hold no examples.")
    if ft.val_files:
        val_rows = read_labelled_rows(ft.val_files, cfg)
        train_rows = rows
    else:
        group = "group" if ft.train_files == ["builtin"] else ft.group_field  # the built-in task: by word / person
        if group and group not in rows[0]:
            raise DataError(f"finetune.group_field={group!r} is not a field of the labelled data (fields: "
                            f"{', '.join(rows[0])}); name the field that groups related examples, or set it to ''.")
        if group:
            key = lambda r: str(r.get(group))  # noqa: E731  related examples never straddle the split
        elif ft.task == "classification":
            key = lambda r: str(r.get(ft.text_field))  # noqa: E731
        elif ft.task == "chat":
            key = lambda r: json.dumps(r.get(ft.messages_field), sort_keys=True)  # noqa: E731
        else:
            key = lambda r: f"{r.get(ft.prompt_field)}\x00{r.get(ft.response_field)}"  # noqa: E731
        held = [is_validation(doc_hash(key(r)), ft.val_fraction, cfg.run.seed) for r in rows]
        train_rows = [r for r, h in zip(rows, held) if not h]
        val_rows = [r for r, h in zip(rows, held) if h]
    if ft.task == "chat":
        return _load_chat(train_rows, val_rows, rows[0], tokenizer, ft)
    fields = (ft.text_field, ft.label_field) if ft.task == "classification" else (ft.prompt_field, ft.response_field)
    for name in fields:
        if name not in rows[0]:
            which = "finetune.text_field / finetune.label_field" if ft.task == "classification" else \
                "finetune.prompt_field / finetune.response_field"
            raise DataError(f"the labelled data has no field {name!r} (fields: {', '.join(rows[0])}); set {which}.")
    text_fields = fields[:1] if ft.task == "classification" else fields
    for split, part in (("training", train_rows), ("validation", val_rows)):
        bad = [i for i, r in enumerate(part)
               if not all(isinstance(r.get(f), str) and r[f].strip() for f in text_fields)]
        if bad:
            raise DataError(f"{len(bad)} of {len(part)} {split} examples have no text in {' / '.join(text_fields)} "
                            f"(first: {str(part[bad[0]])[:120]}); fix or remove them.")
    if ft.train_fraction < 1:  # a seeded subset, for "how much labelled data does pretraining save"
        rng = np.random.default_rng(cfg.run.seed)
        keep = np.sort(rng.permutation(len(train_rows))[: max(1, int(len(train_rows) * ft.train_fraction))])
        train_rows = [train_rows[i] for i in keep]
    if not val_rows or not train_rows:
        raise DataError(f"the labelled data splits into {len(train_rows)} train / {len(val_rows)} validation "
                        "examples; both need some. Add data, set finetune.val_files, or change finetune.val_fraction.")
    if ft.task == "classification":
        labels = sorted({str(r[ft.label_field]) for r in train_rows if r.get(ft.label_field) is not None})
        if len(labels) < 2:
            raise DataError(f"finetune.label_field={ft.label_field!r} has {len(labels)} distinct value(s) in the "
                            "training data; classification needs at least 2 classes.")
        label2id = {label: i for i, label in enumerate(labels)}
        unknown = {str(r.get(ft.label_field)) for r in val_rows} - set(label2id)
        if unknown:
            raise DataError(f"validation labels {sorted(unknown)[:5]} never occur in the training data.")
        (train, lengths), (val, _) = (_encode_classification(part, tokenizer, ft, label2id)
                                      for part in (train_rows, val_rows))
        return LabelledData(train, val, dict(enumerate(labels)), cut_note(lengths, ft.max_len))
    (train, lengths), (val, _) = (_encode_sft(part, tokenizer, ft) for part in (train_rows, val_rows))
    return LabelledData(train, val, {}, cut_note(lengths, ft.max_len))


def cut_note(lengths: list[int], max_len: int) -> str:
    """One sentence, also printed, when `finetune.max_len` cuts off more than 5% of the training examples; else "".
    The cut is silent otherwise, and it can cost more than anything a sweep finds: with its own tokenizer, 32 tokens
    keep the first fifth of a median Debian package description (146 tokens)."""
    cut = sum(n > max_len for n in lengths)
    if cut <= 0.05 * len(lengths):
        return ""
    note = (f"{cut:,} of {len(lengths):,} training examples ({cut / len(lengths):.0%}) are longer than "
            f"finetune.max_len={max_len} tokens and lose their end; half of the examples fit in "
            f"{int(np.percentile(lengths, 50))} tokens, 95% in {int(np.percentile(lengths, 95))}. Raise "
            "finetune.max_len to keep more of each text, up to the model's positions (model.max_positions when it was "
            "pretrained: a model pretrained with more positions can read more).")
    print(f"[finetune] warning: {note}", flush=True)
    return note


def _encode_classification(rows, tokenizer, ft, label2id) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The examples' tensors, and their lengths in tokens before the cut to max_len."""
    texts = [str(r[ft.text_field]) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    enc = tokenizer(texts, max_length=ft.max_len, truncation=True, padding="max_length", return_tensors="pt")
    missing = [i for i, r in enumerate(rows) if r.get(ft.label_field) is None]
    if missing:
        raise DataError(f"{len(missing)} examples have no {ft.label_field!r} label (first: row {missing[0]}).")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([label2id[str(r[ft.label_field])] for r in rows])}, lengths


def _encode_sft(rows, tokenizer, ft) -> tuple[dict[str, torch.Tensor], list[int]]:
    """prompt + response + EOS, right-padded; labels are the response (and EOS) tokens only. Also the examples'
    lengths before the cut to max_len."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.full((len(rows), ft.max_len), pad, dtype=torch.long)
    labels = torch.full((len(rows), ft.max_len), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), ft.max_len), dtype=torch.long)
    prompts = tokenizer([str(r[ft.prompt_field]) + " " for r in rows], add_special_tokens=False)["input_ids"]
    responses = tokenizer([str(r[ft.response_field]) for r in rows], add_special_tokens=False)["input_ids"]
    lengths = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        lengths.append(len(prompt) + len(response) + 1)
        ids = (prompt + response + [eos])[: ft.max_len]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        start = min(len(prompt), ft.max_len)
        labels[i, start: len(ids)] = input_ids[i, start: len(ids)]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}, lengths


def check_pretrained(cfg: Config, tokenizer_dir: str) -> AutoConfig:
    """The pretrained model must exist, be of a supported family, and match its tokenizer."""
    path = pretrained_dir(cfg)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"no pretrained model at {path!r} (config.json missing). Run `ptray pretrain` first, or set "
                          "finetune.pretrained to a local Hugging Face model directory.")
    hf = AutoConfig.from_pretrained(path, local_files_only=True)
    if hf.model_type not in ("gpt2", "llama", "bert"):
        raise ConfigError(f"finetune.pretrained={path!r} is a {hf.model_type!r} model; ptray finetunes gpt2, llama "
                          "and bert models.")
    if cfg.finetune.task != "classification" and hf.model_type == "bert":
        raise ConfigError(f"finetune.task={cfg.finetune.task} needs a causal LM, but {path!r} is a bert (masked LM) "
                          "model; use finetune.task=classification or a gpt2/llama export.")
    positions = getattr(hf, "n_positions", None) or getattr(hf, "max_position_embeddings", None)
    if positions and cfg.finetune.max_len > positions:
        raise ConfigError(f"finetune.max_len={cfg.finetune.max_len} exceeds the {positions} positions of the model in "
                          f"{path!r}; lower finetune.max_len to at most {positions}.")
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > hf.vocab_size:
        raise ConfigError(f"the tokenizer in {tokenizer_dir!r} has {len(tokenizer)} tokens but the model in {path!r} "
                          f"embeds only {hf.vocab_size}: they do not belong together. Use the tokenizer saved with "
                          "the model (its own directory).")
    check_method(cfg.finetune, hf, path)
    if cfg.finetune.teacher:
        check_teacher(cfg.finetune.teacher, path, hf)
    return hf


def check_teacher(teacher: str, student: str, student_config) -> None:
    """A teacher must be a local causal LM that speaks the student's vocabulary, token for token."""
    if not os.path.isfile(os.path.join(teacher, "config.json")):
        raise ConfigError(f"finetune.teacher={teacher!r} is not a model directory (config.json missing); give a local "
                          "causal LM export, e.g. another run's <run.dir>/export.")
    hf = AutoConfig.from_pretrained(teacher, local_files_only=True)
    if hf.model_type not in ("gpt2", "llama"):
        raise ConfigError(f"finetune.teacher={teacher!r} is a {hf.model_type!r} model; a teacher must be a causal LM "
                          "(gpt2 or llama).")
    # With a tokenizer beside it, the tokenizers must be the same (embeddings may be padded differently); without,
    # at least the embedding sizes must agree.
    if os.path.isfile(os.path.join(teacher, "tokenizer.json")):
        differs = tokenizer_hash(teacher) != tokenizer_hash(student) and "its tokenizer differs"
    else:
        differs = hf.vocab_size != student_config.vocab_size and \
            f"it embeds {hf.vocab_size} tokens, the student {student_config.vocab_size}"
    if differs:
        raise ConfigError(f"finetune.teacher={teacher!r} has another vocabulary than the model it would teach "
                          f"({differs}): distillation compares the two models' next-token distributions token by "
                          "token. Use a teacher trained with the same tokenizer.")


# ---- driver --------------------------------------------------------------------------------------------------------


def prepare_finetune(cfg: Config) -> tuple[ray.ObjectRef, LabelledData]:
    """Check the pretrained model, load and tokenize the labelled data once, and put it in the object store."""
    path = pretrained_dir(cfg)
    check_pretrained(cfg, path)
    data = load_labelled(cfg, load_tokenizer(path))
    return ray.put(data), data


def run_name(cfg: Config, data: LabelledData, pretrained: str) -> str:
    """The Train run is named by what it trains: the configuration, the tokenized labelled data and the pretrained
    weights. Rerunning the same command resumes it; changed hyperparameters, edited labelled files or a pretrained
    model trained further start a new run instead of resuming (or returning) the older run's results."""
    digest = hashlib.sha256(cfg.to_yaml().encode())
    for split in (data.train, data.val):
        for key in sorted(split):
            digest.update(key.encode() + split[key].numpy().tobytes())
    digest.update(json.dumps(data.id2label, sort_keys=True).encode())
    for weights in sorted(glob.glob(os.path.join(pretrained, "*.safetensors"))):
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return "train-" + digest.hexdigest()[:10]


def finetune(cfg: Config) -> dict:
    """One finetune run (Ray must be up): train, export the best checkpoint to `<run.dir>/finetune-<task>/export`.

    Re-running the same command resumes the run from its latest checkpoint."""
    cfg = with_absolute_paths(cfg)
    data_ref, data = prepare_finetune(cfg)
    out = os.path.abspath(os.path.join(cfg.run_dir, f"finetune-{cfg.finetune.task}"))
    save_config(cfg, out)
    metric = METRICS[cfg.finetune.task][1] if cfg.finetune.task == "classification" else "val_loss"
    mode = "max" if metric == "val_accuracy" else "min"
    name = run_name(cfg, data, pretrained_dir(cfg))
    sizes = dict(num_examples=len(data.train["labels"]), num_val=len(data.val["labels"]))
    result = fit_with_retries(lambda: build_trainer(cfg, data_ref, storage_path=out, name=name, metric=metric,
                                                    mode=mode, **sizes),
                              max_failures=cfg.cluster.max_failures, label="finetune")
    raise_if_stopped(os.path.join(out, name), result.checkpoint, "finetune")
    best = best_checkpoint(os.path.join(out, name), metric, mode)
    export_finetuned(cfg, best["path"], data, os.path.join(out, "export"))
    print(f"[finetune] best {metric} {best['metrics'][metric]:.4f} at step {best['metrics']['step']}; "
          f"export {os.path.join(out, 'export')}", flush=True)
    return {"metrics": result.metrics, "best": best, "train_dir": os.path.join(out, name)}


def best_checkpoint(train_dir: str, metric: str, mode: str, last_step: int | None = None) -> dict:
    """The complete checkpoint of a Train run with the best `metric` (each checkpoint carries its metrics.json); with
    `last_step`, among those up to that step (a sweep trial that ASHA stopped there). A checkpoint whose save was cut
    short (a run killed while its ranks' files were being written: rank 0's metrics are there, another rank's shards
    not) is passed over for the next best, as resuming does."""
    found = []
    for path in sorted(glob.glob(os.path.join(train_dir, "checkpoint_*"))):
        metrics_file = os.path.join(path, ckpt.METRICS)
        if os.path.isfile(metrics_file):
            metrics = json.load(open(metrics_file))
            in_time = last_step is None or metrics.get("step", 0) <= last_step
            if metric in metrics and math.isfinite(metrics[metric]) and in_time:
                found.append({"path": path, "metrics": metrics})
    for candidate in sorted(found, key=lambda c: c["metrics"][metric], reverse=mode == "max"):
        if (problem := ckpt.verify(candidate["path"])) is None:
            return candidate
        print(f"[finetune] warning: skipping checkpoint {candidate['path']}: {problem}", flush=True)
    raise ConfigError(f"no complete checkpoint in {train_dir} reports a finite {metric!r}; the metrics ptray reports "
                      f"are {', '.join(f'{task}: {names}' for task, names in METRICS.items())}.")


# ---- the model: family, pooling, method ----------------------------------------------------------------------------


HEAD_MODULES = {"gpt2": ("score",), "llama": ("score",), "bert": ("classifier", "pooler")}
"""Each family's classification head, the layers a pretrained LM does not have: what finetune.method=head trains and
finetune.head_lr applies to. BERT's pooler belongs to it: a masked-LM export has none, so it starts random too."""
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "bert": ["query", "key", "value", "dense"]}
"""finetune.lora_targets=[]: every linear layer of the transformer blocks."""
DROPOUT_FIELDS = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"),
                  "llama": ("attention_dropout",),
                  "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")}
"""The config fields finetune.dropout overrides."""


def _named(name: str, suffix: str) -> bool:
    """Whether module `name` ends in the dotted `suffix` (peft's rule for target_modules)."""
    return name == suffix or name.endswith("." + suffix)


def _in_head(name: str, task: str, family: str) -> bool:
    """Whether parameter or module `name` lies in the head (the SFT head is the pretrained, often tied, lm_head)."""
    head = HEAD_MODULES[family] if task == "classification" else ("lm_head",)
    return any(f".{h}." in f".{name}." for h in head)


def _depth(name: str, num_layers: int) -> int:
    """Where parameter `name` sits for finetune.layer_decay: 0 the embeddings, i + 1 transformer block i (gpt2's h.i,
    llama's layers.i, bert's layer.i, LoRA adapters included), num_layers + 1 the rest (final norm, pooler, head)."""
    block = re.search(r"\.(?:h|layers|layer)\.(\d+)\.", f".{name}")
    if block:
        return int(block.group(1)) + 1
    return 0 if re.search(r"embed|\.wte\.|\.wpe\.", f".{name}") else num_layers + 1


def check_method(ft, hf, where: str, model: torch.nn.Module | None = None) -> None:
    """The finetune options that depend on the model's family: pooling=cls needs bert, and every LoRA target must name
    a linear layer of `model` outside the head (None: the architecture of `hf`, built on the meta device, which
    allocates nothing). Runs on the driver before any worker starts, and in each worker for sweep trials."""
    family = hf.model_type
    if ft.task == "classification" and ft.pooling == "cls" and family != "bert":
        raise ConfigError(f"finetune.pooling=cls is not valid for the {family} family of {where!r}: a causal "
                          "model's first token has seen nothing but itself. Use finetune.pooling=last or mean (cls "
                          "is for bert).")
    if ft.task == "classification" and ft.lm_weight and family == "bert":
        raise ConfigError(f"finetune.lm_weight adds a next-token loss, which the bert model in {where!r} was not "
                          "pretrained for (a masked LM); use it with a gpt2 or llama model, or set "
                          "finetune.lm_weight=0.")
    if ft.method != "lora":
        return
    if model is None:
        with torch.device("meta"):
            model = _auto_class(ft.task).from_config(hf)
    linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
              and not _in_head(n, ft.task, family)]
    targets = ft.lora_targets or LORA_TARGETS[family]
    unmatched = [t for t in targets if not any(_named(n, t) for n in linear)]
    if unmatched:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"finetune.lora_targets {unmatched} match no linear layer of the {family} model in {where!r} "
                          f"(the head is always trained in full). Its linear layers are named {', '.join(names)} "
                          f"(e.g. {linear[0]}); list some of those, or set finetune.lora_targets=[] for the "
                          f"{family} defaults ({', '.join(LORA_TARGETS[family])}).")


def _auto_class(task: str):
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def finetune_model(cfg: Config, pretrained: str, num_labels: int, id2label: dict[int, str]):
    """The model to finetune: the pretrained weights (or the same architecture, randomly initialized), with
    finetune.dropout, .method (LoRA adapters, or everything but the head frozen), .head_lr and .pooling applied."""
    ft = cfg.finetune
    hf = AutoConfig.from_pretrained(pretrained, local_files_only=True)
    family = hf.model_type
    if ft.dropout != -1:
        for name in DROPOUT_FIELDS[family]:
            setattr(hf, name, ft.dropout)
    if ft.task == "classification":
        hf.num_labels, hf.id2label = num_labels, {int(k): v for k, v in id2label.items()}
        hf.label2id = {v: int(k) for k, v in id2label.items()}
        if hf.pad_token_id is None:
            hf.pad_token_id = hf.eos_token_id  # sequence classification reads the last non-pad token
    auto = _auto_class(ft.task)
    check_attention(cfg.model.attention)
    kernels = {"dtype": torch.float32, "attn_implementation": cfg.model.attention}
    if ft.init == "scratch":
        model = auto.from_config(hf, **kernels)
    else:
        model = auto.from_pretrained(pretrained, config=hf, local_files_only=True, **kernels)
    check_method(ft, hf, pretrained, model)
    if ft.method == "lora":
        from peft import LoraConfig, get_peft_model

        classification = ft.task == "classification"
        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS" if classification else "CAUSAL_LM", r=ft.lora_rank, lora_alpha=ft.lora_alpha,
            lora_dropout=ft.lora_dropout, target_modules=ft.lora_targets or LORA_TARGETS[family],
            fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores its weight transposed
            # The head trains in full: peft keeps a trainable copy and merge_and_unload puts it in place.
            modules_to_save=list(HEAD_MODULES[family]) if classification else None))
    elif ft.method == "head":
        for name, param in model.named_parameters():
            param.requires_grad = _in_head(name, ft.task, family)
    if ft.layer_decay != 1:
        num_layers = hf.num_hidden_layers
        for name, param in model.named_parameters():
            param.lr_scale = ft.layer_decay ** (num_layers + 1 - _depth(name, num_layers))
    if ft.head_lr:
        for name, param in model.named_parameters():
            if param.requires_grad and _in_head(name, ft.task, family):
                param.lr_scale = ft.head_lr / ft.lr  # engine.param_groups puts it in a group set_lr scales
    if ft.task == "classification" and ft.pooling == "mean":
        model = MeanPooledClassifier(model)
    if ft.task == "classification" and ft.lm_weight:
        model = WithNextTokenLoss(model, next_token_head(model, hf, pretrained, ft.init))
    return model


def transformers_model(model: torch.nn.Module):
    """The transformers model inside `finetune_model`'s wrappers (with any LoRA layers in it)."""
    if isinstance(model, WithNextTokenLoss):
        model = model.classifier
    if isinstance(model, MeanPooledClassifier):
        model = model.model
    return model.get_base_model() if hasattr(type(model), "get_base_model") else model


class MeanPooledClassifier(torch.nn.Module):
    """finetune.pooling=mean: a transformers *ForSequenceClassification model (possibly LoRA-wrapped) whose own head
    reads the mean of the final hidden states over the non-pad tokens (`attention_mask`) instead of one token.

    It saves as that plain model with `ptray_pooling: mean` in config.json and the same pooling as transformers
    remote code (`ptray/hf_mean_pooling.py`): load an export with `load_classifier(path)`, or in plain transformers
    with `AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`. Without that flag
    transformers pools its own way (GPT-2/Llama: the last token; bert: the first), so its predictions differ.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = transformers_model(model).config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SequenceClassifierOutput:
        hf = transformers_model(self.model)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hf_mean_pooling.mean_pool(hidden, attention_mask)  # the same pooling the export's remote code runs
        if self.config.model_type == "bert":  # BertForSequenceClassification's head: pooler, dropout, classifier
            return SequenceClassifierOutput(logits=hf.classifier(hf.dropout(hf.bert.pooler(pooled[:, None]))))
        return SequenceClassifierOutput(logits=hf.score(pooled))  # GPT-2/Llama: score

    def save_pretrained(self, path: str, **kwargs) -> None:
        """The plain model, plus `hf_mean_pooling.py` and an `auto_map` naming its class, so that transformers loads
        it mean-pooled with `trust_remote_code=True`."""
        assert self.model is transformers_model(self.model), "merge LoRA adapters before saving (merge_lora)"
        self.config.ptray_pooling = "mean"
        self.config.auto_map = {"AutoModelForSequenceClassification":
                                f"ptray_mean_pooling.{hf_mean_pooling.CLASSES[self.config.model_type].__name__}"}
        self.model.save_pretrained(path, **kwargs)
        shutil.copyfile(hf_mean_pooling.__file__, os.path.join(path, "ptray_mean_pooling.py"))

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "MeanPooledClassifier":
        return cls(AutoModelForSequenceClassification.from_pretrained(path, **kwargs))


class WithNextTokenLoss(torch.nn.Module):
    """finetune.lm_weight: a classifier whose forward also predicts every next token of its input, from the final
    hidden states through the pretrained output layer (`lm_logits`; GPT-1's auxiliary objective). Training only:
    the export is `.classifier` (see `export_finetuned`), and `.logits` are the classifier's own."""

    def __init__(self, classifier: torch.nn.Module, lm_head: torch.nn.Linear):
        super().__init__()
        self.classifier, self.lm_head = classifier, lm_head
        self.config = classifier.config
        self._hidden: dict[str, torch.Tensor] = {}
        # The final hidden states (after the last norm) are the base model's output, whatever the pooling reads.
        transformers_model(classifier).base_model.register_forward_hook(
            lambda module, args, output: self._hidden.update(last=output.last_hidden_state))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ClassifierLMOutput:
        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
        return ClassifierLMOutput(logits=logits, lm_logits=self.lm_head(self._hidden.pop("last")))


@dataclasses.dataclass
class ClassifierLMOutput(ModelOutput):
    logits: torch.Tensor | None = None
    lm_logits: torch.Tensor | None = None


def next_token_head(classifier: torch.nn.Module, hf, pretrained: str, init: str) -> torch.nn.Linear:
    """The output layer `WithNextTokenLoss` reads: the input embedding itself where the LM ties them (gpt2, ptray's
    llama by default), else the pretrained `lm_head.weight` (a new one, initialized like it, from scratch)."""
    embedding = transformers_model(classifier).get_input_embeddings()
    head = torch.nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
    if getattr(hf, "tie_word_embeddings", True):
        head.weight = embedding.weight
        return head
    torch.nn.init.normal_(head.weight, std=getattr(hf, "initializer_range", 0.02))
    if init != "scratch":
        from safetensors import safe_open

        for path in sorted(glob.glob(os.path.join(pretrained, "*.safetensors"))):
            with safe_open(path, "pt") as weights:
                if "lm_head.weight" in weights.keys():
                    head.weight.data.copy_(weights.get_tensor("lm_head.weight"))
                    return head
        raise ConfigError(f"finetune.lm_weight needs the pretrained output layer (lm_head.weight), which "
                          f"{pretrained!r} does not hold; finetune from a causal LM export, or set "
                          "finetune.lm_weight=0.")
    return head


def load_classifier(path: str, **kwargs) -> torch.nn.Module:
    """A ptray classification export with the pooling it was trained with (`ptray_pooling` in its config.json)."""
    if getattr(AutoConfig.from_pretrained(path), "ptray_pooling", "") == "mean":
        return MeanPooledClassifier.from_pretrained(path, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A trained LoRA model as a plain transformers one: each adapter's update merged into its layer's weight and the
    head's trained copy in place of the original (peft's merge_and_unload); a mean-pooling wrapper stays around it."""
    if isinstance(model, MeanPooledClassifier):
        return MeanPooledClassifier(model.model.merge_and_unload())
    return model.merge_and_unload()


def export_finetuned(cfg: Config, checkpoint_dir: str, data: LabelledData, out_dir: str) -> str:
    """Export a finetune checkpoint in Hugging Face format (the classifier alone, LoRA adapters merged into the
    weights)."""
    torch.manual_seed(cfg.run.seed)
    model = finetune_model(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init="scratch")),
                           pretrained_dir(cfg), len(data.id2label), data.id2label)

    def unwrap(model):  # the classifier alone (no auxiliary next-token head), LoRA adapters merged into its weights
        model = model.classifier if isinstance(model, WithNextTokenLoss) else model
        return merge_lora(model) if cfg.finetune.method == "lora" else model

    if cfg.finetune.task != "chat":
        return ckpt.export_model(cfg, checkpoint_dir, model=model, tokenizer_dir=pretrained_dir(cfg), out_dir=out_dir,
                                 unwrap=unwrap)
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # the export's tokenizer carries the template it learned
        chat_tokenizer(load_tokenizer(pretrained_dir(cfg))).save_pretrained(tokenizer_dir)
        return ckpt.export_model(cfg, checkpoint_dir, model=model, tokenizer_dir=tokenizer_dir, out_dir=out_dir,
                                 unwrap=unwrap)


# ---- worker --------------------------------------------------------------------------------------------------------


def freeze(model, num_layers: int) -> int:
    """Freeze the embeddings and the first `num_layers` transformer blocks; returns the number of frozen tensors."""
    if num_layers <= 0:
        return 0
    base = model.base_model
    blocks = next(m for m in base.modules() if isinstance(m, torch.nn.ModuleList)
                  and len(m) == model.config.num_hidden_layers)
    if num_layers > len(blocks):
        raise ConfigError(f"finetune.freeze_layers={num_layers} but the model has {len(blocks)} blocks.")
    frozen = [p for b in blocks[:num_layers] for p in b.parameters()]
    frozen += list(model.get_input_embeddings().parameters())
    frozen += [p for n, p in base.named_parameters() if "emb" in n or n.split(".")[0] in ("wte", "wpe")]
    for p in frozen:
        p.requires_grad = False
    return len({id(p) for p in frozen})


# The chat template for tokenizers without one (ptray's own BPE): role markers as plain text, each turn ended by the
# end-of-document token, so a model pretrained on ptray's packed documents has seen that token end text.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
CHAT_ROLES = ("system", "user", "assistant")


def chat_tokenizer(tokenizer):
    """The tokenizer with a chat template: its own, or ptray's default."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _load_chat(train_rows: list[dict], val_rows: list[dict], first: dict, tokenizer, ft) -> LabelledData:
    if ft.messages_field not in first:
        raise DataError(f"the labelled data has no field {ft.messages_field!r} (fields: {', '.join(first)}); set "
                        "finetune.messages_field to the field that holds each conversation.")
    for split, part in (("training", train_rows), ("validation", val_rows)):
        for i, row in enumerate(part):
            messages = row.get(ft.messages_field)
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)
                    for m in messages):
                raise DataError(f"{split} example {i} is not a conversation: {ft.messages_field!r} must be a list of "
                                f"{{\"role\": {'|'.join(CHAT_ROLES)}, \"content\": text}} (got "
                                f"{str(messages)[:120]}).")
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                raise DataError(f"{split} example {i} has no assistant turn, so there is nothing to learn from it "
                                f"(roles: {[m['role'] for m in messages]}); add the reply or remove the example.")
    tokenizer = chat_tokenizer(tokenizer)
    (train, lengths), (val, _) = (_encode_chat(part, tokenizer, ft) for part in (train_rows, val_rows))
    return LabelledData(train, val, {}, cut_note(lengths, ft.max_len))


def _encode_chat(rows, tokenizer, ft) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Conversations rendered with the chat template, right-padded to max_len; labels are the tokens of assistant
    turns only. A turn's span is found by rendering the conversation up to it (with the generation prompt) and
    through it, as text, and mapping those character spans to tokens by offset: any template that renders a
    conversation's start the same way (as chat templates do) works, whatever its markup."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), ft.max_len), pad, dtype=torch.long)
    labels = torch.full((len(rows), ft.max_len), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), ft.max_len), dtype=torch.long)
    lengths = []
    for i, row in enumerate(rows):
        messages = row[ft.messages_field]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
                spans.append((start, len(tokenizer.apply_chat_template(messages[: k + 1], tokenize=False))))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        lengths.append(len(enc["input_ids"]))
        ids = enc["input_ids"][: ft.max_len]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        for t, (begin, _) in enumerate(enc["offset_mapping"][: len(ids)]):
            if any(start <= begin < end for start, end in spans):
                labels[i, t] = ids[t]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}, lengths


class FinetuneTask:
    """Classification, or SFT and chat (a causal LM's loss on the labelled tokens), over the labelled tensors: what
    `loop.fit` needs from finetuning."""

    def __init__(self, cfg: Config, schedule: Schedule, data: LabelledData, rank: int, world_size: int):
        self.cfg, self.schedule, self.task = cfg, schedule, cfg.finetune.task
        self.rank, self.world_size = rank, world_size
        # Every rank holds the whole training set and takes its own part of each global batch (see next_batch).
        self.train = data.train
        # Each rank evaluates its own share; `evaluate` sums the counts over ranks, so all ranks get the same metrics.
        self.val = {k: v[rank::world_size] for k, v in data.val.items()}
        # Examples are padded to max_len; a batch is cut to its longest example (see `_cut`).
        self.train_lengths, self.val_lengths = (used_lengths(part["attention_mask"]) if part else None
                                                for part in (self.train, self.val))
        self.num_classes = len(data.id2label)
        self._order: tuple[int, torch.Tensor] | None = None
        self.teacher = None
        if cfg.finetune.teacher:  # in every worker, frozen; moved to the device at the first step
            self.teacher = AutoModelForCausalLM.from_pretrained(cfg.finetune.teacher, local_files_only=True,
                                                                dtype=torch.float32).eval().requires_grad_(False)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The examples' order in an epoch: depends only on (seed, epoch), so a resumed run continues it exactly."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.cfg.run.seed * 1000 + epoch)
            self._order = (epoch, torch.randperm(len(self.train["labels"]), generator=generator))
        return self._order[1]

    def next_batch(self, state: ckpt.TrainerState) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch. An epoch is ceil(N / global batch) steps over one global order of all N
        examples, so every example is seen once per epoch; the last global batch is padded with weight-0 rows."""
        sched = self.schedule
        num_examples, micro, accum = len(self.train["labels"]), sched.micro_batch_size, sched.grad_accum_steps
        if state.batches_in_epoch >= sched.steps_per_epoch * accum:
            state.epoch += 1
            state.batches_in_epoch = 0
        step, micro_step = divmod(state.batches_in_epoch, accum)
        state.batches_in_epoch += 1
        # A global batch is laid out rank by rank, then micro-step by micro-step.
        start = step * sched.global_batch_size + (self.rank * accum + micro_step) * micro
        positions = torch.arange(start, start + micro)
        real = positions < num_examples
        order = self.epoch_order(state.epoch)
        # Cut to the longest example of the whole global batch, which every rank knows: all ranks' micro-batches of a
        # step keep one shape, so `fit` counts the step's tokens without a sync (and torch.compile sees fewer shapes).
        in_step = order[torch.arange(step * sched.global_batch_size, (step + 1) * sched.global_batch_size)
                        .clamp(max=num_examples - 1)]
        batch = _cut({k: v[order[positions.clamp(max=num_examples - 1)]] for k, v in self.train.items()},
                     int(self.train_lengths[in_step].max()))
        # DeepSpeed averages the micro-batch losses over ranks and accumulation steps; weighting each real example by
        # world x accum / (real examples in this global batch) makes that the mean over the real examples.
        real_in_step = min(sched.global_batch_size, num_examples - step * sched.global_batch_size)
        batch["weight"] = real.float() * (self.world_size * accum / real_in_step)
        if self.task != "classification":
            batch["labels"][~real] = IGNORE_INDEX
        return batch

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = output.logits
        if self.task == "classification":
            per_example = F.cross_entropy(logits.float(), batch["labels"], reduction="none",
                                          label_smoothing=self.cfg.finetune.label_smoothing)
            if self.cfg.finetune.lm_weight:
                per_example = per_example + self.cfg.finetune.lm_weight * next_token_loss(
                    output.lm_logits, batch["input_ids"], batch["attention_mask"])
            return (per_example * batch["weight"]).sum()
        if self.teacher is None:
            return self._loss(logits, batch["labels"])
        if self.teacher.device != logits.device:
            self.teacher.to(logits.device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        weight = self.cfg.finetune.distill_weight
        return (1 - weight) * self._loss(logits, batch["labels"]) + weight * distill_loss(
            logits, teacher_logits, batch["labels"], self.cfg.finetune.distill_temperature)

    def _loss(self, logits, labels):
        """The mean loss of a batch (evaluation, and SFT training: the mean over its answer tokens)."""
        if self.task == "classification":
            return F.cross_entropy(logits.float(), labels)
        # The sum over answer tokens by their count, at least 1: a micro-batch of padding only gives 0 (and a backward
        # pass, like every rank's), without the host sync a branch on the count would cost.
        targets = labels[:, 1:]
        total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def evaluate(self, engine) -> dict[str, float]:
        """Metrics over the whole validation set: each rank's share, summed over ranks (one all-reduce)."""
        micro = self.cfg.finetune.micro_batch_size
        # [loss sum, weight, then per class: true positives, false positives, false negatives]
        totals = torch.zeros(2 + 3 * self.num_classes, dtype=torch.float64)
        for i in range(0, len(self.val["labels"]), micro):
            # cut on the host, so only the kept positions are copied to the device
            batch = to_device(_cut({k: v[i: i + micro] for k, v in self.val.items()},
                                   int(self.val_lengths[i: i + micro].max())), engine.device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            weight = len(batch["labels"]) if self.task == "classification" else \
                int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            totals[0] += self._loss(logits, batch["labels"]).item() * weight
            totals[1] += weight
            if self.task == "classification":
                totals[2:] += confusion_counts(logits.argmax(-1).cpu(), batch["labels"].cpu(), self.num_classes)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            totals = totals.to(engine.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        val_loss = (totals[0] / totals[1]).item()
        if self.task != "classification":
            return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        accuracy, f1 = metrics_from_counts(totals[2:])
        return {"val_loss": val_loss, "val_accuracy": accuracy, "val_f1": f1}

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.val["input_ids"][:2], "attention_mask": self.val["attention_mask"][:2]}


def used_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per example, the positions through its last attended token, at least 1: what a batch must keep of it. Right
    padding lies beyond; a left-padded example keeps its whole length (its positions would shift)."""
    attended = attention_mask.bool()
    through_last = attended.size(1) - attended.flip(1).int().argmax(1)
    return torch.where(attended.any(1), through_last, 1)


def _cut(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The batch's sequence tensors cut to `length` positions. Only padding goes (attention never reaches it, and
    SFT labels there are ignored), so the outputs are those of the padded batch: examples no longer cost max_len
    each (the built-in task's examples are 2-11 tokens long, tiny's max_len is 32)."""
    return {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}


def next_token_loss(lm_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per example, the mean next-token cross-entropy over its non-pad positions (finetune.lm_weight)."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    per_token = F.cross_entropy(lm_logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                reduction="none")
    return per_token.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions softened by `temperature`, times its square (Hinton et
    al.: keeps the gradient's scale as the temperature changes), averaged over the labelled positions (those the
    cross-entropy trains on). The teacher's vocabulary may be padded differently: only the shared ids count."""
    vocab = min(logits.size(-1), teacher_logits.size(-1))
    mask = (labels[:, 1:] != IGNORE_INDEX).float()  # multiplied, not indexed: no host sync on a GPU
    student = F.log_softmax(logits[:, :-1, :vocab].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1, :vocab].float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # per position
    return (kl * mask).sum() * temperature**2 / mask.sum().clamp(min=1)


def confusion_counts(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class (true positives, false positives, false negatives), flattened: counts that sum over ranks."""
    counts = torch.zeros(num_classes, 3, dtype=torch.float64)
    for c in range(num_classes):
        counts[c, 0] = ((predictions == c) & (labels == c)).sum()
        counts[c, 1] = ((predictions == c) & (labels != c)).sum()
        counts[c, 2] = ((predictions != c) & (labels == c)).sum()
    return counts.flatten()


def metrics_from_counts(counts: torch.Tensor) -> tuple[float, float]:
    """(accuracy, macro-F1 over the classes present in labels or predictions) from summed `confusion_counts`."""
    tp, fp, fn = counts.view(-1, 3).unbind(-1)
    present = (tp + fp + fn) > 0
    f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1))[present]
    return (tp.sum() / (tp + fn).sum().clamp(min=1)).item(), f1.mean().item()  # every example is a tp or an fn


@worker_entry
def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    ft = cfg.finetune
    data: LabelledData = ray.get(loop_config["data"]) if isinstance(loop_config["data"], ray.ObjectRef) \
        else loop_config["data"]
    rank, world_size, _ = setup_worker(cfg)
    torch.manual_seed(cfg.run.seed)  # same head initialization on every rank
    model = finetune_model(cfg, loop_config["pretrained"], len(data.id2label), data.id2label)
    freeze(transformers_model(model), ft.freeze_layers)
    if rank == 0 and (ft.method != "full" or ft.freeze_layers):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[finetune] method={ft.method}, freeze_layers={ft.freeze_layers}: {trainable:,} of "
              f"{sum(p.numel() for p in model.parameters()):,} parameters train", flush=True)
    schedule = Schedule(**loop_config["schedule"])
    task = FinetuneTask(cfg, schedule, data, rank, world_size)
    num_params = sum(p.numel() for p in model.parameters())
    fit(cfg, schedule, task, model, run_dir=loop_config["run_dir"], checkpoint_root=loop_config["run_dir"],
        flops_per_token=functools.partial(flops_per_token, model.config, num_params), label="finetune",
        keep_best=loop_config["keep_best"], tracker_stage=loop_config["tracker_stage"],
        tracker_parent=loop_config["tracker_parent"])

