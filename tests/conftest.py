"""Shared test set-up: every test sees hf_optim's once-per-cause warnings afresh."""

from __future__ import annotations

import pytest

from hf_optim.util.user_warnings import forget_warnings


@pytest.fixture(autouse=True)
def _fresh_warnings():
    forget_warnings()
    yield
