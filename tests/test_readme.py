"""Every ```python and ```bash block of README.md runs, as a reader would run it.

Python blocks run in order in one namespace (like a notebook), with a tiny model
and dataset bound to the README's placeholders (``model``, ``ds``, ``causal_lm``,
``text_ds``, ``tokenizer``) and the working directory in a temporary folder.
Each bash command runs as a subprocess from the repository root; output paths
go to a temporary folder, placeholders are replaced, and the recipes get a few
tiny-model arguments appended so they take seconds. Commands that are long,
GPU-only or run by another test are listed in ``SKIPPED`` with the reason; any
other command (a new one in the README) must run, or this test fails.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import tiny_bert, tiny_dataset

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

#: command prefix -> why it is not run here
SKIPPED = {
    "make test": "this is the test suite itself",
    "make demo": "the main job (minutes); `hf-optim compare` is tested in tests/test_compare.py",
    "hf-optim bench": "a timing benchmark; tests/test_bench.py runs its table on a small size",
    "hf-optim compare": "the `make demo` run (4 x 40 steps); tests/test_compare.py runs compare on the same recipe",
    "accelerate launch --config_file recipes/accelerate/ddp.yaml": "tests/test_distributed.py runs this exact command",
    "accelerate launch --config_file recipes/accelerate/fsdp2.yaml": "needs GPUs (on CPU accelerate falls back to DDP)",
    "torchrun --nproc_per_node 2 tests/dist/fsdp_worker.py": "tests/test_distributed.py runs this worker",
    "jupyter execute": "tests/test_notebooks.py executes both notebooks",
    ".venv/bin/python benchmarks/": "benchmarks (minutes each), not tests",
    "python benchmarks/gpu_paged.py": "needs a CUDA machine",
    "python benchmarks/gpu_check.py": "needs a CUDA machine; tests/test_triton.py runs its --dry-run",
}

_CLM_TINY = ["--max_steps", "2", "--warmup_steps", "1", "--eval_steps", "2", "--hidden_size", "32",
             "--num_hidden_layers", "1", "--vocab_size", "512", "--max_eval_blocks", "8", "--save_strategy", "no"]
#: command prefix -> arguments appended so the recipe runs in seconds
TINY_ARGS = {
    "python recipes/train_clm.py": _CLM_TINY,
    "python -m hf_optim.recipes.train_clm": _CLM_TINY,
    "accelerate launch --config_file recipes/accelerate/single.yaml recipes/train_clm.py": _CLM_TINY,
    "python recipes/finetune_minilm.py": ["--max_steps", "2", "--warmup_steps", "1", "--eval_strategy", "no",
                                          "--save_strategy", "no", "--trainable_layers", "1", "--max_length", "32"],
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


def bash_commands() -> list[str]:
    commands = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 4 and len(bash_commands()) >= 15
    skipped = [c for c in bash_commands() if _skip_reason(c)]
    assert len(bash_commands()) - len(skipped) >= 9, skipped  # the CLI and recipe commands really run


def _skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    import transformers

    from hf_optim.recipes import recipe_data

    tokenizer = recipe_data.bpe_tokenizer(tmp_path_factory.mktemp("tok"), 260)
    train, _ = recipe_data.lm_texts()
    from datasets import Dataset

    config = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "model": tiny_bert(), "ds": tiny_dataset(), "tokenizer": tokenizer,
        "causal_lm": transformers.LlamaForCausalLM(config),
        "text_ds": Dataset.from_dict({"text": [t[:200] for t in train[:16]]}),
    }


def test_python_blocks_run(tmp_path, monkeypatch, placeholders):
    monkeypatch.chdir(tmp_path)
    # a real module, as a reader's script is: classes defined in a block can be pickled (training_args.bin)
    module = types.ModuleType("readme_blocks")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    namespace.update(placeholders)
    for index, code in enumerate(blocks("python")):
        try:
            exec(compile(code, f"README.md python block {index}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README python block {index} failed: {err!r}\n{code}") from err
    assert (tmp_path / "out").is_dir()  # the first example really trained into "out"


def _argv(command: str, tmp_path: Path, hf_model: Path) -> list[str]:
    command = command.replace("path/to/hf_model", str(hf_model))
    argv = shlex.split(command)
    for i, arg in enumerate(argv):
        if arg.startswith(("out/", "cmp")) and i and argv[i - 1] in ("--output_dir", "--out"):
            argv[i] = str(tmp_path / arg)
    argv += next((extra for prefix, extra in TINY_ARGS.items() if command.startswith(prefix)), [])
    head = argv[0]
    if head == "python":
        argv[0] = sys.executable
    elif (BIN / head).exists():
        argv[0] = str(BIN / head)
    return argv


@pytest.mark.parametrize("command", bash_commands())
def test_bash_command_runs(command, tmp_path_factory):
    reason = _skip_reason(command)
    if reason:
        pytest.skip(reason)
    tmp_path = tmp_path_factory.mktemp("cmd")
    hf_model = tmp_path / "hf_model"
    tiny_bert().save_pretrained(hf_model)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_argv(command, tmp_path, hf_model), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command}\n{output[-4000:]}"
    assert "Traceback" not in output and "Failed to load" not in output, output[-4000:]
