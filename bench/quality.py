"""Learning quality on real text: ptray against a bare single-process PyTorch loop, same model, data and tokens.

    python bench/quality.py                          # the `small` recipe: 1,500 steps, then the sweeps (~2 h, 2 cores)
    python bench/quality.py --steps 400 --no-sweep   # the pretraining comparison only (~15 min)
    python bench/quality.py --steps 400 sweep.num_samples=4 finetune.epochs=2   # extra args: ptray overrides
    python bench/quality.py --task manpages          # the second task: manual pages -> their section

Data: `bench/realdata.py` assembles it from what Debian ships (package descriptions and /usr/share/doc paragraphs as
the unlabelled corpus; other packages' descriptions labelled by archive section as a 4-way task), or with
`--task manpages` `bench/realdata_man.py` from the manual pages (other pages as the corpus; a page's summary labelled
by its manual section), so nothing is kept in the repo. Prints, side by side:
- held-out perplexity of ptray's pretraining (2 Ray Train workers x DeepSpeed ZeRO-2) and of the bare loop (same
  model, same prepared rows, rows drawn uniformly at random, same AdamW and schedule) at every evaluation;
- the swept best accuracy from the pretrained model and from scratch (each side its own search), their seed spread
  and label-fraction points, and the bare untuned references (finetuning the bare-pretrained model, and a scratch
  model, in one process with the config's fixed hyperparameters);
- what the labels alone give with no language model at all: TF-IDF word features and a logistic regression.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bare_lm import bare_finetune, bare_pretrain  # noqa: E402
import realdata  # noqa: E402
import realdata_man  # noqa: E402

TASKS = {"debian": realdata, "manpages": realdata_man}  # --task -> the module that assembles its data

from ptray.config import load_config  # noqa: E402
from ptray.metrics import read_metrics  # noqa: E402
from ptray.pretrain import pretrain  # noqa: E402
from ptray.schedule import pretrain_schedule  # noqa: E402
from ptray.session import ray_session  # noqa: E402
from ptray.sweep import sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="debian",
                        help="debian: package descriptions -> archive section; manpages: a page -> its section")
    parser.add_argument("--out", default="", help="working directory (default /tmp/ptray-quality[-manpages])")
    parser.add_argument("--steps", type=int, default=1500, help="pretraining steps (both sides)")
    parser.add_argument("--no-sweep", action="store_true", help="stop after the pretraining comparison")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the pretraining (both sides) that an earlier run left in --out; sweep only")
    parser.add_argument("overrides", nargs="*", help="ptray config overrides, applied to the `small` recipe")
    args = parser.parse_args()
    args.out = args.out or "/tmp/ptray-quality" + ("" if args.task == "debian" else f"-{args.task}")
    data = os.path.join(args.out, "data")
    summary = TASKS[args.task].assemble(data)
    cfg = load_config("small", [f"run.dir={args.out}/ptray", f"data.train_files=[{data}/corpus/*.txt]",
                                f"finetune.train_files=[{data}/labelled/train.jsonl]",
                                f"finetune.val_files=[{data}/labelled/val.jsonl]", f"pretrain.max_steps={args.steps}",
                                *args.overrides])
    p, m = cfg.pretrain, cfg.model
    warmup_steps = pretrain_schedule(cfg).warmup_steps
    with ray_session(cfg):
        bare_dir = os.path.join(args.out, "bare-export")
        curve_file = os.path.join(args.out, "bare-curve.json")
        if not (args.reuse and os.path.exists(os.path.join(cfg.run_dir, "export")) and os.path.exists(bare_dir)):
            pretrain(cfg)
            bare = bare_pretrain(cfg.prepared_dir, num_layers=m.num_layers, hidden_size=m.hidden_size,
                                 num_heads=m.num_heads, max_positions=m.max_positions, max_steps=p.max_steps,
                                 batch_size=p.global_batch_size, lr=p.lr, warmup_steps=warmup_steps,
                                 weight_decay=p.weight_decay, beta2=p.beta2, min_lr_ratio=p.min_lr_ratio,
                                 eval_every=p.eval_every, seed=cfg.run.seed, save_dir=bare_dir,
                                 num_val_rows=cfg.cluster.num_workers * p.eval_batches * p.micro_batch_size)
            with open(curve_file, "w") as f:
                json.dump(bare["curve"], f)
        ptray_curve = {r["step"]: r["val_ppl"] for r in read_metrics(cfg.run_dir) if "val_ppl" in r}
        bare_curve = json.load(open(curve_file)) if os.path.exists(curve_file) else []
        print(f"\nreal data: {summary}")
        print(f"\npretraining: {m.num_layers} layers x {m.hidden_size}, {p.max_steps} steps of {p.global_batch_size} x "
              f"{cfg.data.seq_len} tokens, lr {p.lr}, warm-up {warmup_steps}; held-out perplexity")
        print(f"{'step':>6} {'ptray':>10} {'bare':>10} {'ratio':>7}")
        for step, _, bare_ppl in bare_curve:
            ours = ptray_curve.get(step)
            print(f"{step:>6} {ours or float('nan'):>10.2f} {bare_ppl:>10.2f} "
                  f"{(ours or float('nan')) / bare_ppl:>7.3f}")
        if args.no_sweep:
            return
        result = sweep(cfg)
        bare_pre = bare_finetune(cfg, bare_dir)
        bare_scratch = bare_finetune(cfg, bare_dir, init="scratch")
    sides = result.best["sides"]
    print(f"\nfinetuning ({cfg.finetune.task}, {summary['num_val']} validation examples, majority class "
          f"{summary['majority_val_accuracy']:.3f}); val_accuracy")
    for side in ("pretrained", "scratch"):
        found = sides.get(side)
        if found:
            print(f"ptray swept best, from {side:<10}: {found['best']:.4f}  "
                  f"(seeds {', '.join(f'{v:.4f}' for v in found['seeds'])};"
                  f" label fractions {json.dumps({k: round(v, 4) for k, v in found['label_fractions'].items()})})")
    print(f"bare untuned, from pretrained     : {bare_pre['final_val_accuracy']:.4f} (best epoch "
          f"{bare_pre['best_val_accuracy']:.4f}; lr {cfg.finetune.lr})")
    print(f"bare untuned, from scratch        : {bare_scratch['final_val_accuracy']:.4f}")
    print(f"labels alone, TF-IDF + logistic   : {bag_of_words_accuracy(cfg):.4f} (no model, no pretraining)")
    print(result.best["verdict"])


def bag_of_words_accuracy(cfg, l2: float = 1e-4) -> float:
    """What the labels alone give, without any language model: TF-IDF word features of the whole text (not cut at
    finetune.max_len) and an L2-regularized logistic regression (L-BFGS), validation accuracy. The regularization is
    fixed, not tuned on the validation set."""
    import collections
    import math
    import re

    import torch

    def rows(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    ft = cfg.finetune
    train, val = rows(ft.train_files[0]), rows(ft.val_files[0])
    words = [re.findall(r"[a-z0-9]+", str(r[ft.text_field]).lower()) for r in train + val]
    document_frequency = collections.Counter(w for doc in words[: len(train)] for w in set(doc))
    vocab = {w: i for i, (w, n) in enumerate(document_frequency.most_common()) if n >= 2}
    features = torch.zeros(len(words), len(vocab))
    for i, doc in enumerate(words):
        for w, n in collections.Counter(doc).items():
            if w in vocab:
                features[i, vocab[w]] = (1 + math.log(n)) * math.log(len(train) / document_frequency[w])
    features = torch.nn.functional.normalize(features, dim=1)
    classes = sorted({str(r[ft.label_field]) for r in train})
    labels = torch.tensor([classes.index(str(r[ft.label_field])) if str(r[ft.label_field]) in classes else -1
                           for r in train + val])
    weights = torch.zeros(len(vocab), len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features[: len(train)] @ weights + bias, labels[: len(train)])
        loss = loss + l2 * (weights ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    predicted = (features[len(train):] @ weights + bias).argmax(1)
    return (predicted == labels[len(train):]).float().mean().item()


if __name__ == "__main__":
    main()
