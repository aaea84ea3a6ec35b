"""``hf-optim compare``: real subprocess runs of a tiny recipe, the report and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_optim.guide import cli, compare

HERE = Path(__file__).resolve().parent
TINY = HERE / "compare_recipe.py"


def _image_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    image = matplotlib.image.imread(path)  # fails unless it is a real PNG
    return image.shape[1], image.shape[0]


def test_compare_runs_each_optimizer_and_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main([
        "compare", "--optims", "adamw,lion_8bit", "--recipe", str(TINY), "--max_steps", "6", "--out", str(out),
        "--", "--per_device_train_batch_size", "16", "--use_cpu", "true", "--save_strategy", "no",
        "--disable_tqdm", "true",
    ])
    assert code == 0
    results = {r["optim"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {"adamw", "lion_8bit"}
    for r in results.values():
        assert r["returncode"] == 0 and math.isfinite(r["final_loss"]) and math.isfinite(r["eval_loss"])
        assert r["peak_rss"] > 50e6 and r["step_time_s"] > 0
    # one 8-bit buffer (+ fp32 for the small tensors) vs two fp32 buffers
    assert results["lion_8bit"]["state_bytes"] < results["adamw"]["state_bytes"] / 4
    # the same seed and data: both start from the same loss
    histories = {}
    for name in results:
        state = json.loads((out / "runs" / name / "trainer_state.json").read_text())
        histories[name] = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(histories["adamw"]) == 6 and histories["adamw"][0] == pytest.approx(histories["lion_8bit"][0])
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "| lion_8bit |" in report and "![loss](loss.png)" in report
    assert "--per_device_train_batch_size 16" in report
    for png in ("loss.png", "memory.png", "lr.png"):
        width, height = _image_size(out / png)
        assert width > 300 and height > 200
    assert "report.md" in capsys.readouterr().out


def test_a_failing_run_is_reported_not_fatal(tmp_path):
    failing = tmp_path / "failing_recipe.py"
    failing.write_text("import sys\nprint('bad flag:', sys.argv[-1])\nsys.exit(3)\n")
    results = compare.compare(["adamw", "lion"], recipe=failing, max_steps=2, out=tmp_path / "o", progress=False,
                              extra_args=["--no_such_flag"])
    assert [r.returncode for r in results] == [3, 3] and results[0].final_loss is None
    assert "exit 3 (see `runs/adamw.log`)" in (tmp_path / "o" / "report.md").read_text()
    assert "bad flag: --no_such_flag" in results[0].log_path.read_text()
    assert (tmp_path / "o" / "loss.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(optims=["adamw", "adamw_9bit"]), ValueError, "Unknown optim 'adamw_9bit'"),
        (dict(optims=[]), ValueError, "at least one"),
        (dict(optims=["adamw"], recipe="missing.py"), FileNotFoundError, "missing.py"),
        (dict(optims=["adamw"], max_steps=0), ValueError, "Invalid max_steps"),
    ],
)
def test_bad_arguments_fail_before_any_run(tmp_path, kwargs, error, match):
    kwargs.setdefault("recipe", TINY)
    with pytest.raises(error, match=match):
        compare.compare(out=tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "runs").exists()


def test_compare_runs_its_own_recipe_from_any_directory(tmp_path, monkeypatch, capsys):
    # the default recipe ships inside the package: no repository checkout in the working directory
    monkeypatch.chdir(tmp_path)
    code = cli.main([
        "compare", "--optims", "adamw_8bit", "--max_steps", "3", "--out", "cmp", "--json",
        "--", "--eval_steps", "3", "--warmup_steps", "1", "--save_strategy", "no",
        "--hidden_size", "32", "--num_hidden_layers", "1", "--vocab_size", "512",
    ])
    (r,) = json.loads(capsys.readouterr().out)
    assert code == 0, (tmp_path / "cmp" / "runs" / "adamw_8bit.log").read_text()[-2000:]
    assert Path(compare.DEFAULT_RECIPE).is_relative_to(Path(compare.__file__).parents[1])  # hf_optim/recipes/
    assert math.isfinite(r["final_loss"]) and math.isfinite(r["eval_loss"]) and r["state_bytes"] > 0
