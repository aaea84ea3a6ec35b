"""Offline data for the recipes: real English text that ships with Python.

``pydoc_data.topics`` (the text behind ``help('topics')``, ~465 KB over 79
topics) is on every CPython install, so the recipes train on real text with
nothing fetched. Eval splits are by topic for the language model (no text
shared with training) and by sentence for classification. Also: a BPE
tokenizer trained locally with ``tokenizers`` and cached, and a guard for the
silent single-process fallbacks of multi-process launches.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets

#: topics for the classification task: distinct subjects with 40+ usable sentences each
CLASSIFY_TOPICS = (
    "formatstrings", "string-methods", "debugger", "attribute-access",
    "comparisons", "import", "execmodel", "try",
)


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as all_topics

    return dict(sorted(all_topics.items()))


def lm_texts(eval_every: int = 10) -> tuple[list[str], list[str]]:
    """(train, eval) topic texts; every ``eval_every``-th topic (sorted by name) is held out."""
    items = list(topics().values())
    train = [t for i, t in enumerate(items) if i % eval_every != eval_every // 2]
    held_out = [t for i, t in enumerate(items) if i % eval_every == eval_every // 2]
    return train, held_out


def bpe_tokenizer(cache_dir: str | os.PathLike, vocab_size: int):
    """A byte-level BPE tokenizer trained on the training topics, cached as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(cache_dir) / f"bpe{vocab_size}" / "tokenizer.json"
    if not path.exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(lm_texts()[0], trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: several ranks may race here
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def lm_datasets(tokenizer, block_size: int) -> datasets.DatasetDict:
    """Train/eval blocks of ``block_size`` tokens (``input_ids`` and ``labels``), via ``datasets``."""
    train, held_out = lm_texts()
    raw = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": train}),
        eval=datasets.Dataset.from_dict({"text": held_out}),
    )

    def tokenize(batch):
        return tokenizer([t + tokenizer.eos_token for t in batch["text"]])

    def blocks(batch):
        ids = [i for seq in batch["input_ids"] for i in seq]
        n = len(ids) // block_size * block_size
        chunks = [ids[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"])
    return tokenized.map(blocks, batched=True, remove_columns=tokenized["train"].column_names)


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if 40 <= len(s) <= 300]


def topic_classification(eval_every: int = 5) -> datasets.DatasetDict:
    """Which pydoc topic does a sentence come from? ``text``/``label``, every 5th sentence held out."""
    by_topic = topics()
    rows = [(s, label) for label, name in enumerate(CLASSIFY_TOPICS) for s in sentences(by_topic[name])]
    train = [r for i, r in enumerate(rows) if i % eval_every]
    held_out = [r for i, r in enumerate(rows) if not i % eval_every]
    as_ds = lambda rs: datasets.Dataset.from_dict({"text": [r[0] for r in rs], "label": [r[1] for r in rs]})  # noqa: E731
    return datasets.DatasetDict(train=as_ds(train), eval=as_ds(held_out))


def check_launch(training_args) -> None:
    """Stop if a multi-process launch would silently train each process alone.

    On a machine without GPUs, ``accelerate launch --multi_gpu`` (or
    recipes/accelerate/ddp.yaml) starts several processes, but the Trainer
    joins them only with ``--use_cpu``; otherwise every process trains its own
    copy and nothing says so.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise SystemExit(
            f"{launched} processes were launched but the Trainer sees world_size={training_args.world_size}: "
            "each would train alone. On a machine without GPUs pass --use_cpu so they join over gloo."
        )
