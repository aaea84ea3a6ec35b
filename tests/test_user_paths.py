"""What transformers, TRL, PEFT and accelerate users run must do what it says (issue 15).

Each test is one path a user takes: optim_args against TrainingArguments, TRL's
SFTTrainer, LoRA adapters under 8-bit state, the train-start report, the cost and
noise of ``import hf_optim``, and the small CLI / resume / keyword errors.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from helpers import tiny_bert, tiny_dataset

import hf_optim
from hf_optim.guide import cli
from hf_optim.integrations import callbacks as cb


def targs(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), learning_rate=1e-3, per_device_train_batch_size=8, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )
    return hf_optim.TrainingArguments(**{**defaults, **kwargs})


# --- 2: optim_args wins over TrainingArguments' per-group values, and says so ---------------


def test_optim_args_weight_decay_lr_betas_eps_win_over_training_arguments(tmp_path, caplog):
    args = targs(tmp_path, optim="adamw", weight_decay=0.0, learning_rate=1e-3, log_level="info",
                 optim_args="weight_decay=0.1,lr=2e-3,betas=(0.8,0.9),eps=1e-7")
    trainer = hf_optim.Trainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    caplog.set_level(logging.INFO)
    opt = trainer.create_optimizer()
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0  # biases and norms never decay
    for group in opt.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (2e-3, (0.8, 0.9), 1e-7)
    assert "weight_decay: weight_decay=0.0 -> 0.1" in caplog.text and "lr: learning_rate=0.001 -> 0.002" in caplog.text
    # get_optimizer_cls_and_kwargs (used by transformers' own code paths) agrees
    _, kwargs = hf_optim.Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["weight_decay"] == 0.1 and kwargs["lr"] == 2e-3


def test_optim_args_weight_decay_really_decays_in_training(tmp_path):
    # no gradient signal can explain the difference: lr*wd shrinks the weights only with the decay applied
    def final_weights(optim_args):
        args = targs(tmp_path, optim="adamw", max_steps=3, weight_decay=0.0, learning_rate=1e-2,
                     optim_args=optim_args)
        trainer = hf_optim.Trainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=tiny_dataset())
        trainer.train()
        return trainer.model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()

    plain, decayed = final_weights("execution=eager"), final_weights("execution=eager,weight_decay=0.5")
    assert decayed.norm() < plain.norm()


# --- 4: TRL, with one import; any other TrainingArguments subclass through with_hf_optim ------


def _tiny_causal_lm(hidden: int = 64):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from hf_optim.recipes import recipe_data

    return recipe_data.bpe_tokenizer(tmp_path_factory.mktemp("tok"), 260)


def _sft_dataset():
    from datasets import Dataset

    from hf_optim.recipes import recipe_data

    train, _ = recipe_data.lm_texts()
    return Dataset.from_dict({"text": [t[:200] for t in train[:32]]})


def _sft_config(tmp_path, **kwargs):
    from hf_optim.trl import SFTConfig

    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                logging_steps=1, save_strategy="no", disable_tqdm=True, bf16=False, max_length=48, seed=0)
    return SFTConfig(**{**base, **kwargs})


@pytest.mark.slow
def test_trl_sft_with_lion_8bit_and_warmup_cosine(tmp_path, byte_tokenizer):
    import trl

    from hf_optim.trl import SFTConfig, SFTTrainer

    args = _sft_config(tmp_path, optim="lion_8bit", lr_scheduler_type="warmup_cosine", learning_rate=3e-4,
                       warmup_steps=1, optim_args="min_8bit_size=0")
    assert isinstance(args, trl.SFTConfig) and args.optim == "lion_8bit"
    trainer = SFTTrainer(model=_tiny_causal_lm(), args=args, train_dataset=_sft_dataset(),
                         processing_class=byte_tokenizer)
    assert trainer.args is args  # TRL kept our config instead of rebuilding a plain SFTConfig
    trainer.train()
    opt = trainer.optimizer.optimizer
    dtypes = {str(t.dtype) for s in opt.state.values() for t in s.values()}
    assert type(opt) is hf_optim.Lion and "torch.int8" in dtypes  # Lion's signed 8-bit momentum
    assert "warmup_cosine" in getattr(trainer.lr_scheduler, "name", "")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    # hf_optim.TrainingArguments given to our SFTTrainer: converted, not rebuilt into TRL's (which rejects it)
    plain = targs(tmp_path, optim="lion", max_steps=1)
    converted = SFTTrainer(model=_tiny_causal_lm(), args=plain, train_dataset=_sft_dataset(),
                           processing_class=byte_tokenizer)
    assert isinstance(converted.args, SFTConfig) and converted.args.optim == "lion"


@dataclasses.dataclass
class MyArgs(transformers.TrainingArguments):  # at module level, as a user's own: importable, so picklable
    my_option: int = 3


def test_with_hf_optim_makes_any_training_arguments_subclass_take_our_names(tmp_path):
    Ours = hf_optim.with_hf_optim(MyArgs)
    args = Ours(str(tmp_path), optim="paged_lamb_8bit", lr_scheduler_type="one_cycle", my_option=5)
    assert isinstance(args, MyArgs) and (args.optim, args.lr_scheduler_type, args.my_option) == (
        "paged_lamb_8bit", "one_cycle", 5)
    assert hf_optim.with_hf_optim(MyArgs) is Ours
    import pickle

    again = pickle.loads(pickle.dumps(args))  # the Trainer saves its arguments with torch.save
    assert type(again) is Ours and again.optim == "paged_lamb_8bit" and again.my_option == 5
    parsed, = transformers.HfArgumentParser(Ours).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adan_8bit"])
    assert parsed.optim == "adan_8bit"
    with pytest.raises(ValueError, match="Did you mean 'adamw'"):
        Ours(str(tmp_path), optim="adamw_typo")
    with pytest.raises(TypeError, match=r"not a transformers\.TrainingArguments subclass"):
        hf_optim.with_hf_optim(dict)


@pytest.mark.slow
def test_lora_adapters_with_adamw_8bit_really_quantize(tmp_path, byte_tokenizer):
    import peft

    from hf_optim.trl import SFTTrainer

    # r=8 on a 64-wide model: every adapter matrix has 8 x 64 = 512 elements, under the general 4096
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = _sft_config(tmp_path, optim="adamw_8bit", learning_rate=1e-3)
    trainer = SFTTrainer(model=_tiny_causal_lm(hidden=64), args=args, train_dataset=_sft_dataset(),
                         processing_class=byte_tokenizer, peft_config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cb.OptimizerWarning)  # nothing to warn about: the adapters quantize
        trainer.train()
    opt = trainer.optimizer.optimizer
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert names and all("lora_" in n for n in names)  # only the adapters train
    rows = opt.precision_report().rows
    assert all(row.precision == "8bit" for row in rows), [(r.name, r.precision) for r in rows]
    adapters = sum(row.numel for row in rows)
    assert opt.precision_report().total_state_bytes < 2.1 * adapters  # 8-bit: ~2 B/param, not fp32's 8


# --- 5: 8-bit that saves nothing warns; bf16 bytes are stated as they are -------------------


def test_8bit_that_quantizes_almost_nothing_warns_once(tmp_path):
    # tiny_bert(hidden=16): every matrix is under 1024 elements, the embeddings match fp32_patterns
    args = targs(tmp_path, optim="adamw_8bit", max_steps=2)
    trainer = hf_optim.Trainer(model=tiny_bert(hidden=16), args=args, train_dataset=tiny_dataset())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    advice = [str(w.message) for w in seen if issubclass(w.category, cb.OptimizerWarning)]
    assert len(advice) == 1 and "8-bit optimizer state covers only 0%" in advice[0], advice
    assert "min_8bit_size=0" in advice[0]
    # the same model with the option the warning names: quantized, and silent
    args = targs(tmp_path, optim="adamw_8bit", max_steps=2, optim_args="min_8bit_size=0")
    trainer = hf_optim.Trainer(model=tiny_bert(hidden=16), args=args, train_dataset=tiny_dataset())
    with warnings.catch_warnings():
        warnings.simplefilter("error", cb.OptimizerWarning)
        trainer.train()


def test_bf16_state_bytes_are_stated_with_kahan_and_the_cheaper_choice(capsys, tmp_path):
    assert cli.main(["memory", "--params", "1B", "--dtype", "bf16", "--optims", "adamw_8bit"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("adamw_8bit"))
    assert "4.031" in row and "2.031" in row and "kahan_sum=False" in out  # 2 B/param Kahan + 2.03
    (mem,) = hf_optim.memory_table(torch.nn.Linear(256, 256).to(torch.bfloat16), optims=["adamw_8bit"])
    assert mem.kahan == 256 * 256 * 2 + 256 * 2  # every bf16 trainable element: one bf16 compensation value
    # the live optimizer agrees with the model, byte for byte
    model = torch.nn.Linear(256, 256).to(torch.bfloat16)
    opt = hf_optim.create_optimizer("adamw_8bit", model, lr=1e-3)
    model(torch.randn(4, 256, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    assert hf_optim.guide.memory.state_bytes(opt) == mem.state
    report = cb.format_report(cb.optimizer_report(opt))
    assert f"({mem.state / (256 * 257):.2f} B/param" in report and "kahan_sum=False" in report
    # recommend says it too
    rec = hf_optim.recommend(n_params="1B", device_memory="12GB", param_dtype="bf16")
    assert rec.optim == "adamw_8bit" and any("kahan_sum=False" in r and "2.03 B/param" in r for r in rec.reasons)
    assert any("4.03 B/param" in r for r in rec.reasons)


# --- 6: the report follows the Trainer's logging; paging stats only when paged --------------


def test_report_is_shown_at_log_level_info_and_paging_keys_only_for_paged(tmp_path):
    script = f"""
import torch, hf_optim
from helpers import tiny_bert, tiny_dataset
for level in ("info", "warning"):
    args = hf_optim.TrainingArguments({str(tmp_path)!r}, optim="lion_8bit", learning_rate=1e-4, max_steps=1,
        per_device_train_batch_size=8, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, log_level=level)
    trainer = hf_optim.Trainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trainer.train()
    keys = [k for e in trainer.state.log_history for k in e if k.startswith("optim/paging/")]
    print("PAGING-KEYS", level, len(keys))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one report, from the run with log_level="info", on stderr like transformers' own logs
    assert proc.stderr.count("hf_optim: optimizer hf_optim.optimizers.Lion") == 1, proc.stderr[-3000:]
    assert "PAGING-KEYS info 0" in proc.stdout and "PAGING-KEYS warning 0" in proc.stdout


# --- 9: import cost and foreign noise --------------------------------------------------------


def test_import_hf_optim_is_light_and_quiet():
    script = (
        "import sys, time; import torch; t = time.perf_counter(); import hf_optim; dt = time.perf_counter() - t\n"
        "heavy = [m for m in ('transformers', 'accelerate', 'datasets', 'torch._inductor', 'trl', 'peft') "
        "if m in sys.modules]\n"
        "opt = hf_optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)\n"
        "print('HEAVY', heavy); print('SECONDS', dt)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout  # the seconds are printed for the report, not asserted
    # the Trainer path: no "Failed to load ..." lines from the peers transformers pulls in
    script = "import hf_optim; hf_optim.TrainingArguments('out', optim='lion'); import hf_optim.trl"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to load" not in proc.stderr and "is an Enum subclass" not in proc.stderr, proc.stderr


# --- 10: the small ones ----------------------------------------------------------------------


def test_memory_with_a_transformers_name_is_an_error_not_a_traceback(capsys):
    assert cli.main(["memory", "--params", "1B", "--optims", "adamw_torch"]) == 2
    err = capsys.readouterr().err
    assert "optim='adamw_torch' is a transformers optimizer" in err and "'adamw'" in err


def test_schedule_of_transformers_needs_no_warmup_flag(capsys):
    assert cli.main(["schedule", "cosine", "--steps", "100", "--json"]) == 0
    import json

    values = json.loads(capsys.readouterr().out)["lr"]
    assert len(values) == 101 and values[0] == pytest.approx(1e-3) and values[-1] < 1e-5


def test_resuming_8bit_state_with_a_torch_optimizer_says_what_to_do(tmp_path):
    data = tiny_dataset()
    first = hf_optim.Trainer(model=tiny_bert(hidden=64), args=targs(
        tmp_path, optim="adamw_8bit", max_steps=4, save_strategy="steps", save_steps=2), train_dataset=data)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    again = hf_optim.Trainer(model=tiny_bert(hidden=64), args=targs(tmp_path, optim="adamw_torch", max_steps=4),
                             train_dataset=data)
    with pytest.raises(ValueError, match=r"holds hf_optim 8bit optimizer state.*Resume with an hf_optim optimizer"):
        again.train(resume_from_checkpoint=str(checkpoint))
    # and what it says works: hf_optim's fp32 AdamW converts the 8-bit state on load
    ours = hf_optim.Trainer(model=tiny_bert(hidden=64), args=targs(tmp_path, optim="adamw", max_steps=4),
                            train_dataset=data)
    ours.train(resume_from_checkpoint=str(checkpoint))
    assert ours.state.global_step == 4


def test_create_optimizer_blames_its_own_keyword_not_optim_args():
    with pytest.raises(ValueError, match=r"^create_optimizer: unknown key 'betaz'.*did you mean 'betas'") as err:
        hf_optim.create_optimizer("adamw", torch.nn.Linear(4, 4), betaz=(0.9, 0.99))
    assert "optim_args" not in str(err.value)
