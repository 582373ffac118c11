"""Shared fixtures and markers: GPU tests skip with a reason where the hardware is missing; the
`world` fixture runs a test once per transport (tests/_contract.py)."""

from __future__ import annotations

import dataclasses

import _fake_nccl
import pytest
import torch
from _contract import WORLDS


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
                item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPUs; {n} visible"))


@pytest.fixture
def seed() -> int:
    torch.manual_seed(1234)
    return 1234


@pytest.fixture
def fake_nccl(monkeypatch):
    """Channels built with transport='nccl' inside run_local get NcclTransport over a fake CUDA
    and NCCL; (the fake NCCL, the transports built per rank)."""
    return _fake_nccl.install(monkeypatch)


@pytest.fixture(
    params=["gloo", "local", "local-streams", "nccl-fakes", pytest.param("nccl-gpu", marks=pytest.mark.gpu)]
)
def world(request):
    """A World of tests/_contract.py: gloo processes, in-process threads (host copies, or the
    stream-ordered path over emulated streams), NCCL over fakes, NCCL on GPUs where present."""
    w = WORLDS[request.param]
    if request.param == "nccl-fakes":
        w = dataclasses.replace(w, fakes=request.getfixturevalue("fake_nccl"))
    return w
