"""Train a small Llama-style causal LM on Python's own documentation, with any hf_optim optimizer.

    python -m hf_optim.recipes.train_clm --output_dir out/clm --optim lamb --lr_scheduler_type warmup_cosine
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train_clm.py --output_dir out/ddp --use_cpu

Every ``--optim`` / ``--optim_args`` / ``--lr_scheduler_type`` /
``--lr_scheduler_kwargs`` value hf_optim or transformers knows is accepted
(``hf_optim.TrainingArguments``). Text: ``pydoc_data.topics`` (ships with
Python), held-out topics for eval; tokenizer: byte-level BPE trained here and
cached under ``<output_dir>/tokenizer``. The defaults are a demo that runs in
seconds on 2 CPU cores and evaluates often enough to draw loss curves;
``hf-optim compare`` drives this script with ``--output_dir --optim
--max_steps --seed`` and reads ``trainer_state.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import transformers

import hf_optim
from hf_optim.recipes import recipe_data


@dataclass
class ModelArgs:
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=192, metadata={"help": "MLP width."})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size (the tokenizer is trained to it)."})


@dataclass
class DataArgs:
    block_size: int = field(default=64, metadata={"help": "Tokens per training sequence."})
    max_eval_blocks: int = field(default=64, metadata={"help": "Cap on eval sequences (keeps frequent eval cheap)."})


#: demo defaults (any of them can be overridden on the command line)
DEFAULTS = dict(
    output_dir="out/train_clm", max_steps=100, learning_rate=3e-3, warmup_steps=10, weight_decay=0.01,
    per_device_train_batch_size=16, per_device_eval_batch_size=32, eval_strategy="steps", eval_steps=20,
    logging_steps=5, save_steps=60, save_total_limit=2, report_to="none", seed=0, disable_tqdm=True,
    dataloader_num_workers=0, dataloader_pin_memory=False,
)


def parse(argv: list[str] | None = None) -> tuple[ModelArgs, DataArgs, hf_optim.TrainingArguments]:
    parser = transformers.HfArgumentParser((ModelArgs, DataArgs, hf_optim.TrainingArguments))
    parser.set_defaults(**DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, args = parse(argv)
    recipe_data.check_launch(args)
    transformers.set_seed(args.seed)
    with args.main_process_first(desc="tokenizer and dataset"):
        tokenizer = recipe_data.bpe_tokenizer(os.path.join(args.output_dir, "tokenizer"), model_args.vocab_size)
        data = recipe_data.lm_datasets(tokenizer, data_args.block_size)
    eval_ds = data["eval"].select(range(min(data_args.max_eval_blocks, len(data["eval"]))))
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_attention_heads,
        max_position_embeddings=data_args.block_size,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    trainer = hf_optim.Trainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=eval_ds,
        data_collator=transformers.default_data_collator, processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model()
    trainer.save_state()
    metrics = {"eval_loss_before": before, "eval_loss": after, "train_loss": result.training_loss}
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    return metrics


if __name__ == "__main__":
    main()
