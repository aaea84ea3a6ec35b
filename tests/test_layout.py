"""The package layout: the README's layout section names what is there, ``import hf_optim`` imports nothing
else of hf_optim, and every public name (and every callback) is reachable where the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import hf_optim

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_optim"


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Layout\n\n```\n(.*?)```", text, re.DOTALL)
    assert match, "README.md has no ## Layout block"
    return match.group(1)


def top_level_entries() -> set[str]:
    """hf_optim's own modules and packages (``engine.py``, ``rules/``), not caches or build outputs."""
    entries = set()
    for path in PACKAGE.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            entries.add(path.name + "/")
        elif path.suffix == ".py":
            entries.add(path.name)
    return entries


def test_readme_layout_names_every_top_level_module_and_package():
    block = layout_block()
    named = set(re.findall(r"(?<![\w/])(?:hf_optim/)?([A-Za-z_]\w*(?:\.py|/))", block))
    missing = sorted(top_level_entries() - named)
    assert not missing, f"README's layout section does not mention {missing}"


def test_readme_layout_names_only_files_that_exist():
    block = layout_block()
    existing = {p.name for p in PACKAGE.rglob("*") if "__pycache__" not in p.parts}
    existing |= {p.name for p in ROOT.iterdir()}
    stale = sorted({name for name in re.findall(r"\b(\w+\.(?:py|c))\b", block)} - existing)
    assert not stale, f"README's layout section names files that are gone: {stale}"
    for folder in re.findall(r"\bhf_optim/(\w+)/", block):
        assert (PACKAGE / folder / "__init__.py").exists(), f"hf_optim/{folder}/ in the layout is not a package"


def test_import_hf_optim_imports_no_submodule():
    # every public name is imported on first use: plain-PyTorch users pay for what they touch
    script = "import sys, hf_optim; print(sorted(m for m in sys.modules if m.startswith('hf_optim.')))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_every_public_name_resolves_where_documented():
    for name in hf_optim.__all__:
        assert getattr(hf_optim, name) is not None, name
    assert callable(hf_optim.recommend) and not isinstance(hf_optim.recommend, type(sys))  # the function
    rec = hf_optim.recommend(n_params="1B", device_memory="80GB")
    assert isinstance(rec, hf_optim.Recommendation) and rec.optim in hf_optim.hf_optim_names()


def test_callbacks_package_gives_every_callback():
    from hf_optim.integrations import callbacks

    assert hf_optim.callbacks is callbacks
    for name in callbacks.__all__:
        assert getattr(callbacks, name) is not None, name
    kinds = {type(cb) for cb in callbacks.default_callbacks()}
    assert kinds == {callbacks.OptimizerReportCallback, callbacks.GuardRailCallback, callbacks.LossSpikeCallback}
    # one family per module, each under the size the layout keeps modules to
    for path in (PACKAGE / "integrations" / "callbacks").glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path.name
