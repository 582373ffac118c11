"""Shared fixtures and markers: GPU tests skip with a reason where the hardware is missing."""

from __future__ import annotations

import pytest
import torch


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    n = _gpu_count()
    for item in items:
        if item.get_closest_marker("gpu") is not None and n < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible"))
        mark = item.get_closest_marker("multigpu")
        if mark is not None:
            need = mark.args[0] if mark.args else 2
            if n < need:
                item.add_marker(
                    pytest.mark.skip(reason=f"needs {need} CUDA GPUs; {n} visible")
                )


@pytest.fixture
def seed() -> int:
    torch.manual_seed(1234)
    return 1234
