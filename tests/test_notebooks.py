"""Execute the notebooks top to bottom (nbclient), as a reader would from the repository root.

A cell that raises fails the test; the notebooks assert their own claims
(the 8-bit state is really quantized, hf_optim's AdamW follows torch's Adam,
every compare run exits 0). The compare notebook runs a short compare into a
temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _execute(name: str, tmp_path: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    book = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    old = dict(os.environ)
    os.environ.update({"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **env})
    try:
        NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return book


def _text(book: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "") for cell in book.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


def test_saddle_point(tmp_path):
    book = _execute("saddle_point.ipynb", tmp_path, {})
    text = _text(book)
    assert "uint8" in text and "Lion (hf_optim)" in text and "SGD Nesterov" in text


def test_choosing_an_optimizer(tmp_path):
    book = _execute(
        "choosing_an_optimizer.ipynb", tmp_path,
        {"HF_OPTIM_NOTEBOOK_OUT": str(tmp_path / "compare"), "HF_OPTIM_NOTEBOOK_STEPS": "10"},
    )
    assert (tmp_path / "compare" / "report.md").is_file()
    assert "bytes/param of state" in _text(book)
