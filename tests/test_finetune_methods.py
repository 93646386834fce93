"""Finetuning options: pooling (last, mean, cls), method (full, head, lora), head_lr, label_smoothing, lm_weight and
dropout.

Pure functions first (tiny random GPT-2/Llama/BERT directories, no Ray), then two real 2-worker finetune runs on a tiny
GPT-2 export: LoRA with an auxiliary next-token loss (only adapters and head change; the export is plain
merged weights) and head-only with mean pooling and its own head learning rate (the body is exactly the pretrained one).

    python -m pytest -q tests/test_finetune_methods.py
"""

import dataclasses
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, BertForMaskedLM,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from conftest import tiny_config
from ptray import checkpoint as ckpt
from ptray import engine as ds
from ptray.config import load_config
from ptray.data.tokenizer import load_tokenizer
from ptray.errors import ConfigError
from ptray.metrics import read_metrics
from ptray.finetune import (FinetuneTask, LabelledData, MeanPooledClassifier, confusion_counts, finetune,
                            finetune_model, load_classifier, load_labelled, metrics_from_counts, prepare_finetune)
from ptray.trial import finetune_schedule

LABELS = {0: "a", 1: "b", 2: "c"}


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """Randomly initialized 2-layer, width-64 language models of each family, saved like a pretraining export."""
    root = tmp_path_factory.mktemp("random_models")
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0, pad_token_id=0)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
                                              eos_token_id=0, pad_token_id=0)),
        "bert": BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, pad_token_id=0))}
    for family, model in models.items():
        model.save_pretrained(root / family)
    return {family: str(root / family) for family in models}


def _model(path, *overrides, seed=0):
    torch.manual_seed(seed)
    return finetune_model(load_config("tiny", list(overrides)), path, len(LABELS), LABELS).eval()


def _batch():
    """Three sequences, the first right-padded after 6 tokens (pad id 0, attention_mask 0)."""
    ids = torch.randint(1, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_mean_pooling_averages_non_pad_tokens_and_round_trips(random_models, family, tmp_path):
    last = _model(random_models[family], "finetune.pooling=last")
    mean = _model(random_models[family], "finetune.pooling=mean")
    assert isinstance(mean, MeanPooledClassifier)
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), mean.model.state_dict().values()))
    ids, mask = _batch()
    with torch.no_grad():
        pooled_logits, last_logits = mean(ids, mask).logits, last(input_ids=ids, attention_mask=mask).logits
        hidden = last.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        average = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        expected = last.classifier(last.bert.pooler(average[:, None])) if family == "bert" else last.score(average)
        assert torch.allclose(pooled_logits, expected, atol=1e-6)
        assert not torch.allclose(pooled_logits, last_logits, atol=1e-3)  # same weights, other predictions
        changed_pads = ids.clone()
        changed_pads[0, 6:] = 5  # tokens the mask hides do not count
        assert torch.allclose(mean(changed_pads, mask).logits, pooled_logits, atol=1e-6)

    mean.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["ptray_pooling"] == "mean"
    loaded = load_classifier(str(tmp_path)).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()  # plain transformers: its own pooling
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        assert isinstance(loaded, MeanPooledClassifier) and torch.equal(loaded(ids, mask).logits, pooled_logits)
        assert torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, last_logits, atol=1e-6)
        # the export's own code (auto_map): plain transformers, mean-pooled as trained
        assert type(remote).__name__.startswith("MeanPooled")
        assert torch.allclose(remote(input_ids=ids, attention_mask=mask).logits, pooled_logits, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_head_lr_gets_its_own_param_groups(random_models, method):
    model = _model(random_models["gpt2"], f"finetune.method={method}", "finetune.lr=1e-3", "finetune.head_lr=2e-2",
                   "finetune.pooling=last")  # parameter names of the plain model (mean pooling wraps it)
    groups = ds.param_groups(model, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    ds.set_lr(types.SimpleNamespace(optimizer=optimizer), 5e-4)  # the schedule's rate at some step
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in trainable.items()}
    seen = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = name_of[id(p)]
            seen.append(name)
            head = name.startswith(("score.", "base_model.model.score."))
            assert group["lr"] == pytest.approx(1e-2 if head else 5e-4)
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    assert sorted(seen) == sorted(trainable)  # every trainable tensor exactly once
    assert any("lora_A" in n for n in seen) == (method == "lora")  # adapters train at finetune.lr, like the body

    plain = _model(random_models["gpt2"], "finetune.pooling=last")
    groups = ds.param_groups(plain, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and {g["lr_scale"] for g in groups} == {1.0}


def test_head_method_freezes_all_but_the_head_and_dropout_overrides(random_models):
    gpt2 = _model(random_models["gpt2"], "finetune.method=head", "finetune.dropout=0.25", "finetune.pooling=last")
    assert [n for n, p in gpt2.named_parameters() if p.requires_grad] == ["score.weight"]
    assert (gpt2.config.resid_pdrop, gpt2.config.embd_pdrop, gpt2.config.attn_pdrop) == (0.25, 0.25, 0.25)
    assert {m.p for m in gpt2.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}
    bert = _model(random_models["bert"], "finetune.method=head", "finetune.dropout=0.0", "finetune.pooling=cls")
    assert {n.split(".")[-2] for n, p in bert.named_parameters() if p.requires_grad} == {"dense", "classifier"}
    assert not any(p.requires_grad for p in bert.bert.encoder.parameters())
    assert {m.p for m in bert.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    kept = _model(random_models["bert"])  # -1: the pretrained model's own (BertConfig's default 0.1)
    assert {m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_sft_lora_trains_only_adapters_and_merges_into_a_plain_causal_lm(random_models):
    from ptray.finetune import merge_lora

    model = _model(random_models["gpt2"], "finetune.task=sft", "finetune.method=lora", "finetune.lora_targets=[c_attn]")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".c_attn.lora_" in n for n in trainable)  # no head: the tied lm_head stays frozen
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # as if trained (B starts at zero)
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = merge_lora(model)
        assert type(merged) is GPT2LMHeadModel and not any("lora" in k for k in merged.state_dict())
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # gpt2 ties its output layer to the embedding, this llama not
def test_lm_weight_adds_the_pretrained_models_next_token_loss(random_models, family):
    path = random_models[family]
    ids, mask = _batch()
    plain = _model(path, "finetune.pooling=mean")
    aided = _model(path, "finetune.pooling=mean", "finetune.lm_weight=0.5")
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        output = aided(input_ids=ids, attention_mask=mask)
        assert torch.equal(output.logits, plain(ids, mask).logits)  # the classifier is unchanged
        expected_lm = lm(input_ids=ids, attention_mask=mask).logits  # the pretrained LM's own next-token predictions
        assert torch.allclose(output.lm_logits[..., :128], expected_lm, atol=1e-5)

    cfg = load_config("tiny", ["finetune.lm_weight=0.5", "cluster.num_workers=1", "finetune.micro_batch_size=3",
                               "finetune.global_batch_size=3"])
    labels = torch.tensor([0, 1, 2])
    data = LabelledData(train={"input_ids": ids, "attention_mask": mask, "labels": labels}, val={}, id2label=LABELS)
    task = FinetuneTask(cfg, finetune_schedule(cfg, 3, 3), data, rank=0, world_size=1)
    batch = task.next_batch(ckpt.TrainerState())
    with torch.no_grad():
        loss = task.loss(aided, batch)
        order = [int(torch.nonzero((ids == row).all(1))[0]) for row in batch["input_ids"]]
        next_token = [F.cross_entropy(expected_lm[i, : int(mask[i].sum()) - 1], ids[i, 1: int(mask[i].sum())])
                      for i in order]
        classification = F.cross_entropy(plain(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
    assert loss.item() == pytest.approx(classification.item() + 0.5 * torch.stack(next_token).mean().item(), rel=1e-5)


def test_lm_weight_needs_a_causal_model_and_a_trained_body(random_models):
    with pytest.raises(ConfigError, match="finetune.lm_weight.*bert.*masked LM"):
        _model(random_models["bert"], "finetune.lm_weight=0.5")
    with pytest.raises(ConfigError, match="finetune.lm_weight.*method=head"):
        load_config("tiny", ["finetune.lm_weight=0.5", "finetune.method=head"])


def test_label_smoothing_in_the_training_loss_only():
    cfg = load_config("tiny", ["finetune.label_smoothing=0.2", "cluster.num_workers=1", "finetune.micro_batch_size=4",
                               "finetune.global_batch_size=4"])
    generator = torch.Generator().manual_seed(0)

    def examples(n):
        return {"input_ids": torch.randint(0, 9, (n, 5), generator=generator),
                "attention_mask": torch.ones(n, 5, dtype=torch.long), "labels": torch.randint(0, 3, (n,))}

    data = LabelledData(train=examples(8), val=examples(4), id2label=LABELS)
    task = FinetuneTask(cfg, finetune_schedule(cfg, 8, 4), data, rank=0, world_size=1)
    engine = lambda input_ids, attention_mask: types.SimpleNamespace(logits=input_ids[:, :3].float())  # noqa: E731
    engine.device = torch.device("cpu")
    train_batch = task.next_batch(ckpt.TrainerState())
    logits, labels = train_batch["input_ids"][:, :3].float(), train_batch["labels"]
    assert task.loss(engine, train_batch).item() == pytest.approx(
        F.cross_entropy(logits, labels, label_smoothing=0.2).item())
    assert task.loss(engine, train_batch).item() != pytest.approx(F.cross_entropy(logits, labels).item())
    val_loss = F.cross_entropy(task.val["input_ids"][:, :3].float(), task.val["labels"]).item()
    assert task.evaluate(engine)["val_loss"] == pytest.approx(val_loss)  # comparable across label_smoothing values


@pytest.mark.parametrize("family,overrides", [("gpt2", ["finetune.pooling=mean"]), ("gpt2", ["finetune.pooling=last"]),
                                              ("llama", ["finetune.pooling=mean"]),
                                              ("bert", ["finetune.pooling=cls", "pretrain.objective=mlm"]),
                                              ("gpt2", ["finetune.task=sft"])])
def test_batches_are_cut_to_the_longest_example_of_their_global_batch_and_lose_nothing(random_models, family,
                                                                                        overrides):
    # 11 examples right-padded to 12 positions; 2 ranks x micro-batch 2 x 2 accumulation steps = 8 a step, 2 steps.
    cfg = load_config("tiny", ["cluster.num_workers=2", "finetune.micro_batch_size=2", "finetune.global_batch_size=8",
                               "finetune.max_len=12", f"model.family={family}", *overrides])
    lengths = torch.tensor([3, 1, 5, 2, 4, 3, 2, 9, 1, 2, 3])
    n, max_len, world, accum = len(lengths), 12, 2, 2
    mask = (torch.arange(max_len) < lengths[:, None]).long()
    ids = torch.randint(1, 128, (n, max_len), generator=torch.Generator().manual_seed(2)) * mask  # pad id 0
    labels = torch.where(mask == 1, ids, -100) if cfg.finetune.task == "sft" else torch.arange(n) % 3
    data = LabelledData(train={"input_ids": ids, "attention_mask": mask, "labels": labels},
                        val={"input_ids": ids, "attention_mask": mask, "labels": labels}, id2label=LABELS)
    schedule = finetune_schedule(cfg, n, n)
    tasks = [FinetuneTask(cfg, schedule, data, rank=r, world_size=world) for r in range(world)]
    states = [ckpt.TrainerState(world_size=world) for _ in range(world)]
    torch.manual_seed(0)
    model = finetune_model(cfg, random_models[family], len(LABELS), LABELS).eval()
    engine = lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask)  # noqa: E731
    engine.device = torch.device("cpu")
    order = tasks[0].epoch_order(0)

    def padded(batch):  # the batch as it was before the cut: padding back to max_len
        return {k: F.pad(v, (0, max_len - v.shape[1]), value=-100 if k == "labels" else 0) if v.dim() == 2 else v
                for k, v in batch.items()}

    for step in range(schedule.steps_per_epoch):
        batches = [task.next_batch(state) for task, state in zip(tasks, states) for _ in range(accum)]
        longest = int(lengths[order[step * 8: (step + 1) * 8]].max())
        assert longest < max_len and {b["input_ids"].shape[1] for b in batches} == {longest}  # one shape, all ranks
        with torch.no_grad():
            for task, batch in zip([t for t in tasks for _ in range(accum)], batches):
                for row, row_mask in zip(batch["input_ids"], batch["attention_mask"]):  # every attended token kept
                    example = int(torch.nonzero((ids[:, :longest] == row).all(1))[0])
                    assert int(row_mask.sum()) == lengths[example]
                assert task.loss(engine, batch).item() == pytest.approx(task.loss(engine, padded(batch)).item(),
                                                                        rel=1e-5, abs=1e-6)
    uncut = FinetuneTask(cfg, schedule, data, rank=0, world_size=1)
    uncut.val_lengths = torch.full((n,), max_len)  # evaluation cuts each micro-batch to its own longest example
    with torch.no_grad():
        cut_metrics, uncut_metrics = FinetuneTask(cfg, schedule, data, 0, 1).evaluate(engine), uncut.evaluate(engine)
    assert cut_metrics == pytest.approx(uncut_metrics, rel=1e-5)


def test_every_labelled_example_is_seen_once_per_epoch_and_the_step_loss_is_their_mean():
    # 37 examples, 2 ranks x micro-batch 4 x 2 accumulation steps = 16 per step: 3 steps per epoch, the last one padded.
    cfg = load_config("tiny", ["cluster.num_workers=2", "finetune.micro_batch_size=4", "finetune.global_batch_size=16"])
    n, world, accum = 37, 2, 2
    train = {"input_ids": torch.arange(n)[:, None].repeat(1, 3), "attention_mask": torch.ones(n, 3, dtype=torch.long),
             "labels": torch.arange(n) % 3}
    data = LabelledData(train=train, val=train, id2label=LABELS)
    schedule = finetune_schedule(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=2)), n, n)
    assert (schedule.max_steps, schedule.steps_per_epoch, schedule.grad_accum_steps) == (2 * 3, 3, accum)
    tasks = [FinetuneTask(cfg, schedule, data, rank=r, world_size=world) for r in range(world)]
    states = [ckpt.TrainerState(world_size=world) for _ in range(world)]
    engine = lambda input_ids, attention_mask: types.SimpleNamespace(  # noqa: E731
        logits=torch.stack([input_ids[:, 0].float() / n, -input_ids[:, 0].float() / n, torch.zeros(len(input_ids))], 1))
    engine.device = torch.device("cpu")
    epochs = []
    for _ in range(2):
        seen = []
        for step in range(3):
            batches = [task.next_batch(state) for task, state in zip(tasks, states) for _ in range(accum)]
            real = torch.cat([b["input_ids"][:, 0][b["weight"] > 0] for b in batches])
            seen += real.tolist()
            # DeepSpeed averages the micro-batch losses over ranks x accumulation: that must be the real examples' mean
            averaged = sum(task.loss(engine, b) for task, b in zip([t for t in tasks for _ in range(accum)], batches))
            logits = engine(train["input_ids"][real], None).logits
            assert averaged / (world * accum) == pytest.approx(F.cross_entropy(logits, train["labels"][real]).item())
        assert sorted(seen) == list(range(n))  # each example exactly once, none dropped
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh order every epoch
    assert states[0].epoch == 1


def test_validation_counts_from_rank_shards_sum_to_the_whole_set_metrics():
    # Each finetuning rank evaluates labels[rank::world_size]; the summed counts must give the single-process metrics.
    generator = torch.Generator().manual_seed(0)
    predictions, labels = (torch.randint(0, 4, (101,), generator=generator),
                           torch.randint(0, 4, (101,), generator=generator))
    labels[labels == 3] = 2  # a class only predicted, never true: still counted in macro-F1
    world = 3
    summed = sum(confusion_counts(predictions[r::world], labels[r::world], 4) for r in range(world))
    accuracy, f1 = metrics_from_counts(summed)
    assert accuracy == pytest.approx((predictions == labels).float().mean().item())
    f1s = []
    for c in range(4):
        tp, fp = ((predictions == c) & (labels == c)).sum().item(), ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert f1 == pytest.approx(sum(f1s) / 4)
    assert metrics_from_counts(confusion_counts(predictions[0::world], labels[0::world], 4))[0] != \
        pytest.approx(accuracy, abs=1e-9)  # one rank's share alone is a different number


@pytest.mark.parametrize("family,method", [("gpt2", "full"), ("llama", "full"), ("bert", "full"), ("gpt2", "lora")])
def test_layer_decay_scales_each_block_below_the_top(random_models, family, method):
    # 2 blocks: the top (final norm, head) at lr, block 1 at 0.5 lr, block 0 at 0.25 lr, the embeddings at 0.125 lr;
    # with head_lr the head keeps its own rate.
    model = _model(random_models[family], f"finetune.method={method}", "finetune.lr=1e-3", "finetune.layer_decay=0.5",
                   "finetune.head_lr=4e-3", "finetune.pooling=last" if family != "bert" else "finetune.pooling=cls")
    optimizer = torch.optim.AdamW(ds.param_groups(model, weight_decay=0.1), lr=1.0)
    ds.set_lr(types.SimpleNamespace(optimizer=optimizer), 1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = {n: lr_of[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert len(named) == len(lr_of)  # every trainable tensor in exactly one group

    def rate(*parts):
        matches = {lr for n, lr in named.items() if all(part in n for part in parts)}
        assert len(matches) == 1, (parts, matches)
        return matches.pop()

    block = {"gpt2": ".h.{}.", "llama": ".layers.{}.", "bert": ".layer.{}."}[family]
    embedding = {"gpt2": "wte", "llama": "embed_tokens", "bert": "word_embeddings"}[family]
    head = {"gpt2": "score", "llama": "score", "bert": "classifier"}[family]
    inner = "lora_A" if method == "lora" else ""
    assert rate(block.format(1), inner) == pytest.approx(5e-4)
    assert rate(block.format(0), inner) == pytest.approx(2.5e-4)
    assert rate(head) == pytest.approx(4e-3)
    if method == "full":  # LoRA leaves the embeddings and norms frozen
        assert rate(embedding) == pytest.approx(1.25e-4)
        top = {"gpt2": "ln_f", "llama": "model.norm", "bert": "pooler"}[family]  # bert's pooler is in its head
        assert rate(top) == pytest.approx(4e-3 if family == "bert" else 1e-3)


@pytest.mark.parametrize("override,named", [
    ("finetune.pooling=max", "finetune.pooling"), ("finetune.method=adapter", "finetune.method"),
    ("finetune.lora_rank=0", "finetune.lora_rank"), ("finetune.lora_dropout=1.0", "finetune.lora_dropout"),
    ("finetune.head_lr=-1", "finetune.head_lr"), ("finetune.label_smoothing=1.0", "finetune.label_smoothing"),
    ("finetune.dropout=1.5", "finetune.dropout"), ("finetune.lora_targets=['']", "finetune.lora_targets"),
    ("finetune.lm_weight=-1", "finetune.lm_weight"), ("finetune.layer_decay=0", "finetune.layer_decay"),
    ("finetune.layer_decay=1.5", "finetune.layer_decay")])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("tiny", [override])


@pytest.mark.parametrize("override", ["finetune.pooling=last", "finetune.head_lr=1e-2", "finetune.method=head",
                                      "finetune.label_smoothing=0.1", "finetune.lm_weight=0.5"])
def test_classification_only_options_are_rejected_for_sft(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + ".*classification"):
        load_config("tiny", ["finetune.task=sft", override])
    load_config("tiny", ["finetune.task=sft", "finetune.method=lora"])  # LoRA adapters serve SFT too


def test_lora_targets_must_name_linear_layers_in_the_worker_too(random_models):
    with pytest.raises(ConfigError, match=r"finetune.lora_targets \['qkv'\].*q_proj"):
        _model(random_models["llama"], "finetune.method=lora", "finetune.lora_targets=[qkv, o_proj]")
    with pytest.raises(ConfigError, match="finetune.pooling=cls is not valid for the llama family"):
        _model(random_models["llama"], "finetune.pooling=cls")
    assert isinstance(_model(random_models["bert"], "finetune.pooling=cls"), torch.nn.Module)  # bert's own head


# ---- real 2-worker runs on a pretrained export ---------------------------------------------------------------------

# 200 examples, 1 epoch: ~10 steps of 16; one evaluation and checkpoint at the end, so the best is the final one.
FINETUNE_FAST = ["finetune.builtin_examples=200", "finetune.epochs=1", "finetune.eval_every=1000"]


@pytest.fixture(scope="module")
def pretrained(ray_local, tmp_path_factory):
    """What `ptray pretrain --config tiny` exports, as of step 0: ptray's BPE tokenizer trained on the built-in corpus
    and the tiny GPT-2 (2 layers, width 64), randomly initialized. Pretraining it would add minutes on 2 cores and
    nothing these tests look at: they compare finetuned weights with whatever the starting weights are."""
    from ptray.data.builtin import generate_documents
    from ptray.data.tokenizer import train_bpe
    from ptray.model import build_model, padded_vocab_size

    export = str(tmp_path_factory.mktemp("pretrained") / "export")
    cfg = tiny_config(export)
    train_bpe(generate_documents(2000), vocab_size=cfg.data.vocab_size, out_dir=export)
    tokenizer = load_tokenizer(export)
    torch.manual_seed(0)
    build_model(cfg.model, vocab_size=padded_vocab_size(len(tokenizer)), special_ids={
        "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id,
    }).save_pretrained(export)
    return export


def _config(pretrained, run_dir, *overrides):
    return tiny_config(run_dir, f"finetune.pretrained={pretrained}", *FINETUNE_FAST, *overrides)


def _pretrained_weights(export):
    return AutoModelForCausalLM.from_pretrained(export).state_dict()


def _val_accuracy(model, cfg, export):
    val = load_labelled(cfg, load_tokenizer(export)).val
    with torch.no_grad():
        logits = model.eval()(input_ids=val["input_ids"], attention_mask=val["attention_mask"]).logits
    return (logits.argmax(-1) == val["labels"]).float().mean().item()


def test_bad_family_options_stop_before_any_worker(pretrained, tmp_path, capsys):
    from ptray.cli import main

    with pytest.raises(ConfigError, match="finetune.max_len=4096 exceeds the 128 positions of the model"):
        prepare_finetune(_config(pretrained, tmp_path, "finetune.max_len=4096"))
    with pytest.raises(ConfigError, match="finetune.pooling=cls is not valid for the gpt2 family"):
        prepare_finetune(_config(pretrained, tmp_path, "finetune.pooling=cls"))
    with pytest.raises(ConfigError, match=r"finetune.lora_targets \['q_proj'\] match no linear layer.*c_attn"):
        prepare_finetune(_config(pretrained, tmp_path, "finetune.method=lora", "finetune.lora_targets=[q_proj]"))
    code = main(["finetune", "--config", "tiny", f"run.dir={tmp_path}", f"finetune.pretrained={pretrained}",
                 "finetune.method=lora", "finetune.lora_targets=[c_attn, qkv]"])
    assert code == 2 and "finetune.lora_targets ['qkv']" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "finetune-classification" / "export")


def test_lora_trains_adapters_and_head_and_exports_merged_weights(pretrained, tmp_path):
    from ptray.engine import consolidated_state_dict

    # With an auxiliary next-token loss too: it trains the adapters, and the export is the classifier alone.
    cfg = _config(pretrained, tmp_path, "finetune.method=lora", "finetune.lora_rank=4", "finetune.lr=1e-2",
                  "finetune.dropout=0.1", "finetune.label_smoothing=0.1", "finetune.lm_weight=0.5")
    out = finetune(cfg)
    base = _pretrained_weights(pretrained)

    # In training only the adapters and the head's copy changed: every base weight is still the pretrained one.
    trained = consolidated_state_dict(out["best"]["path"], zero_stage=cfg.deepspeed.zero_stage)
    adapters = [k for k in trained if "lora_" in k]
    assert adapters and all(trained[k].abs().max() > 0 for k in adapters if "lora_B" in k)  # B starts at 0
    assert any(k.startswith("lm_head") for k in trained)  # the auxiliary head, tied to the frozen embedding
    for key, value in trained.items():
        if "lora_" in key or ".score." in key or key.startswith("lm_head"):
            continue
        plain_key = key.removeprefix("classifier.model.").removeprefix("base_model.model.")  # our wrappers, peft's
        assert torch.equal(value, base[plain_key.replace(".base_layer", "")]), key

    # The export is a plain transformers model: pretrained weights plus a rank <= 4 update on the LoRA targets only.
    export = os.path.join(tmp_path, "finetune-classification", "export")
    model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True)  # mean-pooled
    assert model.config.resid_pdrop == 0.1 and not hasattr(model, "peft_config")
    targets = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    merged = 0
    for key, value in model.state_dict().items():
        if key == "score.weight":
            continue
        if key.endswith(targets):
            singular = torch.linalg.svdvals(value - base[key])
            assert singular[0] > 0 and singular[4:].max() < 1e-4 * singular[0], key
            merged += 1
        else:
            assert torch.equal(value, base[key]), key
    assert merged == 4 * cfg.model.num_layers
    assert _val_accuracy(model, cfg, export) == pytest.approx(out["best"]["metrics"]["val_accuracy"], abs=1e-6)


def test_head_only_with_mean_pooling_and_head_lr(pretrained, tmp_path):
    # The body's rate is negligible: the head moves only if it really trains at finetune.head_lr.
    cfg = _config(pretrained, tmp_path, "finetune.method=head", "finetune.pooling=mean", "finetune.lr=1e-9",
                  "finetune.head_lr=1e-2")
    out = finetune(cfg)
    export = os.path.join(tmp_path, "finetune-classification", "export")
    assert json.load(open(os.path.join(export, "config.json")))["ptray_pooling"] == "mean"
    model = load_classifier(export)
    assert isinstance(model, MeanPooledClassifier)
    exported, base = model.model.state_dict(), _pretrained_weights(pretrained)
    assert all(torch.equal(value, base[key]) for key, value in exported.items() if key != "score.weight")
    torch.manual_seed(cfg.run.seed)  # the head's initialization on the workers
    id2label = load_labelled(cfg, load_tokenizer(export)).id2label
    initial = finetune_model(cfg, pretrained, len(id2label), id2label).model.score.weight
    assert (exported["score.weight"] - initial).abs().max() > 1e-3  # ~1e-8 had it trained at finetune.lr
    assert _val_accuracy(model, cfg, export) == pytest.approx(out["best"]["metrics"]["val_accuracy"], abs=1e-6)
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()  # loads; pools the last token
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, model(ids).logits)


# ---- chat ----------------------------------------------------------------------------------------------------------


def test_chat_labels_cover_the_assistant_turns_only(pretrained):
    from ptray.finetune import _encode_chat, chat_tokenizer

    tokenizer = chat_tokenizer(load_tokenizer(pretrained))  # ptray's BPE has no template: the default one
    messages = [{"role": "system", "content": "answer briefly."},
                {"role": "user", "content": "where does merege live?"},
                {"role": "assistant", "content": "merege lives in vuri."},
                {"role": "user", "content": "and her pet?"},
                {"role": "assistant", "content": "a red kibe."}]
    ft = load_config("tiny", ["finetune.task=chat", "finetune.max_len=200"]).finetune
    encoded, lengths = _encode_chat([{"messages": messages}], tokenizer, ft)
    ids, labels, mask = encoded["input_ids"][0], encoded["labels"][0], encoded["attention_mask"][0]
    eos = tokenizer.eos_token
    assert tokenizer.decode(ids[mask.bool()]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids[labels >= 0]) == f"merege lives in vuri.{eos}\na red kibe.{eos}\n"
    assert torch.equal(labels[labels >= 0], ids[labels >= 0])
    short, short_lengths = _encode_chat([{"messages": messages}], tokenizer, dataclasses.replace(ft, max_len=20))
    assert short["input_ids"].shape == (1, 20) and tokenizer.decode(short["input_ids"][0]).startswith("<|system|>")
    assert short_lengths == lengths == [int(mask.sum())] and lengths[0] > 20  # the length before the cut


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hello?"}]}, "has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "no assistant turn"),
    ({"messages": "just text"}, "is not a conversation"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "is not a conversation"),
    ({"conversation": []}, "has no field 'messages'"),
])
def test_a_chat_record_that_is_not_a_conversation_with_a_reply_is_an_error(pretrained, tmp_path, record, message):
    from ptray.errors import DataError

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [record] + [good] * 20) + "\n")
    cfg = _config(pretrained, tmp_path, "finetune.task=chat", f"finetune.train_files=[{path}]",
                  f"finetune.val_files=[{path}]")
    with pytest.raises(DataError, match=message):
        load_labelled(cfg, load_tokenizer(pretrained))


def test_chat_finetunes_and_the_export_chats_in_plain_transformers(pretrained, tmp_path):
    from transformers import AutoTokenizer

    from ptray.finetune import DEFAULT_CHAT_TEMPLATE

    cfg = _config(pretrained, tmp_path, "finetune.task=chat", "finetune.max_len=64", "finetune.lr=3e-3")
    out = finetune(cfg)
    export = os.path.join(tmp_path, "finetune-chat", "export")
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # saved with the model: plain transformers renders it
    # The export is the best checkpoint: its loss on the validation conversations' assistant tokens is the reported one.
    val = load_labelled(cfg, load_tokenizer(pretrained)).val
    with torch.no_grad():
        logits = model(input_ids=val["input_ids"], attention_mask=val["attention_mask"]).logits
    targets = val["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(out["best"]["metrics"]["val_loss"], rel=1e-4)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "where does merege live?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|assistant|>\n")


# ---- distillation --------------------------------------------------------------------------------------------------


def test_distill_loss_is_the_tempered_kl_on_labelled_positions():
    from ptray.finetune import distill_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 13)  # the teacher's vocabulary padded further
    labels = torch.full((2, 6), -100)
    labels[0, 3:], labels[1, 1:3] = 5, 7
    assert distill_loss(student, student, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    mask = labels[:, 1:] != -100
    s = F.log_softmax(student[:, :-1] / 2.0, dim=-1)[mask]
    t = F.log_softmax(teacher[:, :-1, :11] / 2.0, dim=-1)[mask]
    expected = F.kl_div(s, t, log_target=True, reduction="batchmean") * 4.0
    assert distill_loss(student, teacher, labels, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_teacher_must_be_a_causal_lm_with_the_same_vocabulary(pretrained, random_models, tmp_path):
    import shutil

    from ptray.data.tokenizer import train_bpe

    with pytest.raises(ConfigError, match="finetune.teacher distills a causal LM"):
        load_config("tiny", ["finetune.teacher=/some/model"])  # classification
    sft = ("finetune.task=sft",)
    with pytest.raises(ConfigError, match="is not a model directory"):
        prepare_finetune(_config(pretrained, tmp_path, *sft, f"finetune.teacher={tmp_path}/missing"))
    with pytest.raises(ConfigError, match="a teacher must be a causal LM"):
        prepare_finetune(_config(pretrained, tmp_path, *sft, f"finetune.teacher={random_models['bert']}"))
    other = tmp_path / "other"
    shutil.copytree(pretrained, other)
    train_bpe((f"different words number {i} here" for i in range(500)), vocab_size=300, out_dir=str(tmp_path / "t"))
    shutil.copy(tmp_path / "t" / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(ConfigError, match="has another vocabulary.*its tokenizer differs"):
        prepare_finetune(_config(pretrained, tmp_path, *sft, f"finetune.teacher={other}"))


def test_distillation_runs_the_teacher_in_the_workers(pretrained, tmp_path):
    """Distilling only (weight 1) from a teacher identical to the starting weights: the student already matches it,
    so the training loss is ~0 from the first step, where the labels' cross-entropy is several nats (the logged loss
    averages the first 10 steps, over which the student drifts from the teacher: about 1e-3). Validation stays the
    plain cross-entropy."""
    overrides = ("finetune.task=sft", "finetune.dropout=0", "finetune.max_len=48")
    plain = finetune(_config(pretrained, tmp_path / "plain", *overrides))
    distilled = finetune(_config(pretrained, tmp_path / "distilled", *overrides, f"finetune.teacher={pretrained}",
                                 "finetune.distill_weight=1.0"))
    first = {name: next(r for r in read_metrics(out["train_dir"]) if "loss" in r)
             for name, out in (("plain", plain), ("distilled", distilled))}
    assert first["plain"]["loss"] > 2.0 and first["distilled"]["loss"] < 1e-2, first
    assert distilled["best"]["metrics"]["val_loss"] > 2.0
