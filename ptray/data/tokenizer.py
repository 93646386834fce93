"""Tokenizers: train a byte-level BPE with `tokenizers`, or load a local Hugging Face tokenizer directory.

Either way the result is a directory that `transformers.AutoTokenizer.from_pretrained` loads, and every tokenizer
ptray uses has an end-of-document token (packed between documents) and a mask token (for MLM).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable

from ptray import storage
from ptray.errors import ConfigError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"


def train_bpe(texts: Iterable[str], *, vocab_size: int, out_dir: str) -> None:
    """Train a byte-level BPE tokenizer on `texts` (streamed) and save it in Hugging Face format to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                 mask_token=MASK, unk_token=None)
    _save_atomically(hf, out_dir)


def copy_tokenizer(src_dir: str, out_dir: str) -> None:
    """Load a local tokenizer directory (checking it is usable) and save a copy next to the prepared data."""
    _save_atomically(load_tokenizer(src_dir), out_dir)


def _save_atomically(tokenizer, out_dir: str) -> None:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """Load a Hugging Face tokenizer directory (local, or a URI: downloaded once); ConfigError if it is missing or lacks
    an end-of-document token."""
    if storage.is_uri(path) and storage.exists(path):
        path = storage.local_dir(path)
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer directory {path!r} does not exist. Set data.tokenizer_path to a local "
                          "Hugging Face tokenizer directory, or leave it empty to train a BPE tokenizer on the corpus.")
    try:
        tokenizer = _tokenizer_class(path).from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {e}. It must hold tokenizer.json or the files "
                          "save_pretrained writes.") from None
    if end_of_document_id(tokenizer) is None:
        raise ConfigError(f"tokenizer {path!r} has no eos or sep token to separate packed documents; add one.")
    if tokenizer.pad_token is None:  # GPT-2's own tokenizer has none: pad with EOS, as transformers users do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def _tokenizer_class(path: str):
    """The class that loads a tokenizer directory: the plain fast tokenizer for those ptray trains, else AutoTokenizer
    (whose import, of every model family's tokenizer and torch, takes a second)."""
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            # transformers 5 writes TokenizersBackend (PreTrainedTokenizerFast is its alias), 4.x the alias
            plain = json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
    except (OSError, ValueError, AttributeError):
        plain = False
    if plain:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


@functools.lru_cache(maxsize=4)
def fast_tokenizer(path: str):
    """The Rust tokenizer (`tokenizers.Tokenizer`) of a tokenizer directory that `load_tokenizer` has checked, for
    the Ray Data tasks that tokenize the corpus: it loads from tokenizer.json without importing transformers, which
    costs a fresh worker process seconds."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(storage.local_dir(path), "tokenizer.json"))


def end_of_document_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def tokenizer_hash(path: str) -> str:
    """A short hash of the tokenizer's vocabulary and rules, recorded in the manifest and checked at training time."""
    tokenizer = load_tokenizer(path)
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
