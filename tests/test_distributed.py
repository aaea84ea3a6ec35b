"""Two processes on CPU over gloo: DDP through ``accelerate launch`` and FSDP2 through ``torchrun``.

Each launch runs every optimizer under test once (launch and import cost
dominate); the workers in tests/dist/ write one result file per rank, and
the assertions live here. Every test first checks that two ranks really ran
and formed one group of 2: launchers fall back to a single process, or to
independent processes, without an error (``accelerate launch --cpu
--num_processes 2`` runs one; the Trainer on a CPU-only machine trains each
process alone unless ``use_cpu`` is set; FSDP through Trainer on CPU becomes
DDP), so a test that only looked at one result would pass for all of those.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tests" / "dist"
sys.path.insert(0, str(DIST))
from common import single_process_run  # noqa: E402

pytestmark = pytest.mark.slow

DDP_NAMES = ("adamw_8bit", "lamb")
#: the native LAMB and LARS take their global norms from the sharded norm's batch (one all-reduce per bucket)
FSDP_NAMES = ("adamw", "adamw_8bit", "lamb", "lamb@native", "lars@native")
FSDP_STEPS = 6
TIMEOUT = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    files = sorted(out.glob("rank*.pt"))
    # the launcher must really have started two ranks that formed one group
    assert [f.name for f in files] == ["rank0.pt", "rank1.pt"], f"rank files: {[f.name for f in files]}"
    results = [torch.load(f, weights_only=False) for f in files]
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results), [r["world"] for r in results]
    return results


# --- DDP: hf_optim.Trainer under accelerate launch ----------------------------------------


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / "ddp.yaml"),
        "--main_process_port", str(_free_port()),
        str(DIST / "ddp_worker.py"), str(out), *DDP_NAMES,
    ]
    return _launch(cmd, out)


@pytest.mark.parametrize("name", DDP_NAMES)
def test_ddp_two_ranks_train_identically(ddp_results, name):
    r0, r1 = ddp_results
    for r in (r0, r1):  # the Trainer itself saw both processes (not two lone runs)
        assert r["num_processes"] == 2 and r["backend"] == "gloo", (r["num_processes"], r["backend"])
    run0, run1 = r0["runs"][name], r1["runs"][name]
    assert run0["optimizer"].startswith("hf_optim."), run0["optimizer"]
    if name.endswith("_8bit"):
        assert "torch.uint8" in run0["state_dtypes"], run0["state_dtypes"]  # really quantized
    assert len(run0["losses"]) == 4 and all(torch.isfinite(torch.tensor(run0["losses"])))
    for key, value in run0["params"].items():
        assert torch.equal(value, run1["params"][key]), f"{name}: {key} differs across ranks"
        assert not torch.equal(value, run0["initial"][key]), f"{name}: {key} never changed"


def test_readme_ddp_recipe_command_keeps_ranks_identical_after_a_baseline_evaluate(tmp_path):
    """The README's DDP command, verbatim but for a tiny model and few steps.

    The recipe evaluates before training (a baseline); without hf_optim's fix
    transformers then never wraps the model in DDP and each rank trains alone,
    exit code 0. hf_optim.Trainer hashes every rank's final parameters: rank 0 logs
    the hashes (compared here, bit for bit) and any mismatch fails the run.
    """
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("accelerate launch") and "ddp.yaml" in line)
    argv = command.split()
    assert argv[:5] == ["accelerate", "launch", "--config_file", "recipes/accelerate/ddp.yaml", "recipes/train_clm.py"]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "ddp")
    port = str(_free_port())
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:4], "--main_process_port", port]
    tiny = ["--max_steps", "3", "--warmup_steps", "1", "--eval_steps", "3", "--hidden_size", "32",
            "--num_hidden_layers", "1", "--vocab_size", "512", "--max_eval_blocks", "8", "--save_strategy", "no",
            "--log_level", "info"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *argv[4:], *tiny], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    line = next((x for x in output.splitlines() if "ranks ended with identical parameters" in x), None)
    assert line is not None, output[-6000:]
    digests = line.split("sha256 per rank: ")[1].rstrip(")").split()
    assert len(digests) == 2 and digests[0] == digests[1], line


# --- FSDP2: fully_shard under torchrun, against one process --------------------------------


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(DIST / "fsdp_worker.py"), str(out), str(FSDP_STEPS), *FSDP_NAMES,
    ]
    return _launch(cmd, out)


def _assert_matches(name: str, key: str, ref: torch.Tensor, got: torch.Tensor) -> None:
    """Equal up to fp32 rounding of the gradient all-reduce.

    Adam-type updates divide by sqrt(v), so an element whose gradient is near
    zero turns a last-bit difference into a visible one; that happens to a
    handful of elements. A wrong algorithm (e.g. LAMB trust ratios from
    per-shard norms) moves most elements: mean error ~1e-6, most elements off.
    """
    diff = (ref - got).abs()
    assert diff.mean() < 1e-7, f"{name} {key}: mean |diff| {diff.mean():.3g}"
    assert (diff > 1e-6).float().mean() < 1e-3, f"{name} {key}: {(diff > 1e-6).float().mean():.2%} elements off"
    assert diff.max() < 2e-4, f"{name} {key}: max |diff| {diff.max():.3g}"


@pytest.mark.parametrize("name", FSDP_NAMES)
def test_fsdp2_matches_single_process(fsdp_results, name):
    r0, r1 = fsdp_results
    run0, run1 = r0["runs"][name], r1["runs"][name]
    # uneven shards: 63 rows over 2 ranks
    assert run0["local_shapes"]["0.weight"] == (32, 128) and run1["local_shapes"]["0.weight"] == (31, 128)
    if name.endswith("_8bit"):  # quantization decided from the global numel (8064), not the shard's
        assert "torch.uint8" in run0["state_dtypes"] and "torch.uint8" in run1["state_dtypes"]
    ref_losses, ref_params = single_process_run(name, FSDP_STEPS)
    torch.testing.assert_close(torch.tensor(run0["losses"]), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    assert run0["losses"][-1] < run0["losses"][0]
    for key, ref in ref_params.items():
        assert torch.equal(run0["params"][key], run1["params"][key]), f"{name}: {key} gathered differently"
        _assert_matches(name, key, ref, run0["params"][key])


@pytest.mark.parametrize("name", FSDP_NAMES)
def test_fsdp2_distributed_checkpoint_round_trip(fsdp_results, name):
    results = fsdp_results
    for r in results:
        dcp = r["dcp"][name]
        assert "error" not in dcp, dcp.get("error")
        for key, value in dcp["params"].items():  # resumed optimizer continues exactly
            assert torch.equal(value, dcp["resumed_params"][key]), f"{name}: {key} differs after DCP load"
