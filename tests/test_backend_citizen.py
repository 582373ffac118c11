"""The "bls" backend as torch.distributed sees it: loaded by torch itself, and a full ProcessGroup.

- Entry point: a plain `import torch` registers "bls" (group "torch.backends"), in a fresh process,
  with the optional GPU and TorchRec stacks missing; TORCH_DEVICE_BACKEND_AUTOLOAD=0 gives torch's
  own "Unknown backend" error; the registration never raises.
- Citizen: group_name, _get_backend(device), functional collectives (all_to_all_single through the
  BLS channel), init_device_mesh, all_gather_into_tensor, reduce_scatter_tensor, new_group,
  monitored_barrier, on CPU tensors (one W=3 world for all of them) and on a GPU when there is one.
TorchRec's DMP and a reference-DLRM loop on "bls" are in test_torchrec_dropin.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from blsgpu import _autoload, run_world

# --------------------------------------------------------------------------------------------------
# Entry point

_OPTIONAL = ["cupy", "cupy_backends", "cuda", "nvtx", "triton", "torchrec", "fbgemm_gpu", "matplotlib"]

_PLAIN_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys

    OPTIONAL = set(sys.argv[1].split(","))

    class Missing(importlib.abc.MetaPathFinder):  # as if the optional packages were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in OPTIONAL:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Missing())
    import torch  # the only import: no blsgpu
    import torch.distributed as dist

    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "blsgpu")
    out = {"loaded_by_torch": loaded,
           "optional_loaded": sorted({m.split(".")[0] for m in sys.modules} & OPTIONAL)}
    try:
        dist.init_process_group("bls", store=dist.HashStore(), rank=0, world_size=1)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    else:
        recv = torch.empty(4)
        dist.all_to_all_single(recv, torch.arange(4.0), async_op=True).wait()
        pg = dist.group.WORLD
        out.update(backend=dist.get_backend(), group=type(pg).__module__ + "." + type(pg).__name__,
                   recv=recv.tolist(), posted=pg.channel_stats()["cpu"]["posted"])
        dist.destroy_process_group()
    print(json.dumps(out))
    """
)


def _plain_torch(autoload: bool) -> dict:
    env = dict(os.environ)
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    if not autoload:
        env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    p = subprocess.run(
        [sys.executable, "-c", _PLAIN_TORCH, ",".join(_OPTIONAL)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_entry_point_is_declared_in_group_torch_backends():
    eps = [
        ep
        for ep in importlib.metadata.entry_points(group="torch.backends")
        if ep.value == "blsgpu._autoload:register"
    ]
    assert eps, (
        "blsgpu's torch.backends entry point is not installed: "
        "run `pip install -e .` again after pulling (pyproject.toml changed)"
    )


def test_plain_import_torch_registers_bls_without_optional_packages():
    got = _plain_torch(autoload=True)
    assert "error" not in got, got["error"]
    assert "blsgpu._autoload" in got["loaded_by_torch"]
    assert got["optional_loaded"] == []  # light: no GPU stack, no TorchRec, no plotting
    assert got["backend"] == "bls" and got["group"] == "blsgpu.backend.BLSProcessGroup"
    assert got["recv"] == [0.0, 1.0, 2.0, 3.0] and got["posted"] == 1


def test_autoload_off_gives_torchs_unknown_backend_error():
    got = _plain_torch(autoload=False)
    assert got["loaded_by_torch"] == []
    assert "Unknown backend" in got["error"] and "bls" in got["error"], got["error"]


def test_registration_never_raises(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("registry broken")

    monkeypatch.setattr(dist.Backend, "_plugins", {})  # as if "bls" were not registered yet
    monkeypatch.setattr(dist.Backend, "register_backend", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _autoload.register()  # would make `import torch` fail if it raised
    assert any("'bls' was not registered" in str(c.message) for c in caught)


# --------------------------------------------------------------------------------------------------
# A full ProcessGroup, CPU tensors: one W=3 world, one test per feature


def _expected_a2a(rank: int, w: int) -> list[float]:
    # rank s sends s+1 rows to every peer, row values 100 * s + 10 * peer + i
    return [100.0 * s + 10 * rank + i for s in range(w) for i in range(s + 1)]


def _citizen_body(rank, w):
    import torch.distributed._functional_collectives as fc
    from torch._C._distributed_c10d import _resolve_process_group
    from torch.distributed.device_mesh import init_device_mesh

    pg = dist.group.WORLD
    out = {}
    cpu = pg._get_backend(torch.device("cpu"))
    out["name"] = {
        "name": pg.group_name,
        "resolves": _resolve_process_group(pg.group_name) is pg,
        "cpu_backend": type(cpu).__name__,
        "is_gloo": cpu is pg.gloo,
    }

    # Functional collectives: all_to_all_single resolves the group by name, then runs the channel.
    before = pg.channel_stats().get("cpu", {}).get("posted", 0)
    send = torch.cat([100.0 * rank + 10 * p + torch.arange(rank + 1.0) for p in range(w)])
    recv = fc.all_to_all_single(send, [s + 1 for s in range(w)], [rank + 1] * w, group=pg)
    recv = fc.wait_tensor(recv)
    out["funcol"] = {
        "recv": recv.tolist(),
        "posted": pg.channel_stats()["cpu"]["posted"] - before,
        "all_reduce": fc.all_reduce(torch.ones(2), "sum", pg).tolist(),
    }

    mesh = init_device_mesh("cpu", (w,), mesh_dim_names=("x",))
    two_d = init_device_mesh("cpu", (1, w), mesh_dim_names=("a", "b"))
    via_mesh = fc.wait_tensor(
        fc.all_to_all_single(send, [s + 1 for s in range(w)], [rank + 1] * w, group=mesh)
    )
    out["mesh"] = {
        "group_is_world": mesh.get_group() is pg,
        "name": mesh.get_group().group_name,
        "recv": via_mesh.tolist(),
        "two_d": [
            two_d["a"].size(),
            two_d["b"].size(),
            fc.all_reduce(torch.ones(1), "sum", two_d["b"]).item(),
        ],
    }

    gathered = torch.empty(2 * w)
    dist.all_gather_into_tensor(gathered, torch.tensor([rank, 10.0 * rank]))
    out["all_gather_into_tensor"] = gathered.tolist()

    scattered = torch.empty(2)
    dist.reduce_scatter_tensor(scattered, torch.arange(2.0 * w) * (rank + 1))
    out["reduce_scatter_tensor"] = scattered.tolist()

    sub = dist.new_group([0, 1])  # collective over the world; rank 2 is not in it
    if sub is dist.GroupMember.NON_GROUP_MEMBER:
        out["new_group"] = "not a member"
    else:
        r = torch.empty(2)
        dist.all_to_all_single(r, torch.full((2,), float(rank)), group=sub, async_op=True).wait()
        out["new_group"] = {
            "type": type(sub).__name__,
            "name": sub.group_name,
            "resolves": _resolve_process_group(sub.group_name) is sub,
            "recv": r.tolist(),
            "posted": sub.channel_stats()["cpu"]["posted"],
        }

    try:
        dist.monitored_barrier(timeout=timedelta(seconds=30))
        refused = None
    except ValueError as e:
        refused = str(e)
    pg.monitored_barrier(timedelta(seconds=30))  # the group's own: gloo's monitored barrier
    out["monitored_barrier"] = refused
    return out


@pytest.fixture(scope="module")
def citizen():
    return run_world(3, _citizen_body, backend="bls", timeout_s=120)


def test_group_name_and_backend_per_device(citizen):
    for got in citizen:
        assert got["name"]["name"] and got["name"]["resolves"]
        assert got["name"]["cpu_backend"] == "ProcessGroupGloo" and got["name"]["is_gloo"]


def test_functional_all_to_all_single_runs_through_the_bls_channel(citizen):
    for rank, got in enumerate(citizen):
        assert got["funcol"]["recv"] == _expected_a2a(rank, 3)
        assert got["funcol"]["posted"] == 1
        assert got["funcol"]["all_reduce"] == [3.0, 3.0]


def test_init_device_mesh(citizen):
    for rank, got in enumerate(citizen):
        assert got["mesh"]["group_is_world"] and got["mesh"]["name"] == got["name"]["name"]
        assert got["mesh"]["recv"] == _expected_a2a(rank, 3)
        assert got["mesh"]["two_d"] == [1, 3, 3.0]


def test_all_gather_into_tensor(citizen):
    for got in citizen:
        assert got["all_gather_into_tensor"] == [0.0, 0.0, 1.0, 10.0, 2.0, 20.0]


def test_reduce_scatter_tensor(citizen):
    for rank, got in enumerate(citizen):
        assert got["reduce_scatter_tensor"] == [6.0 * 2 * rank, 6.0 * (2 * rank + 1)]


def test_new_group_is_a_bls_group(citizen):
    names = set()
    for rank in (0, 1):
        got = citizen[rank]["new_group"]
        assert got["type"] == "BLSProcessGroup" and got["resolves"]
        assert got["recv"] == [0.0, 1.0] and got["posted"] == 1
        names.add(got["name"])
    assert len(names) == 1 and citizen[0]["name"]["name"] not in names
    assert citizen[2]["new_group"] == "not a member"


def test_monitored_barrier(citizen):
    # torch's dist.monitored_barrier runs only on a group whose backend is named gloo and says so;
    # the group's own pg.monitored_barrier() runs gloo's (the body called it on every rank).
    for got in citizen:
        assert "only implemented for GLOO" in got["monitored_barrier"]


# --------------------------------------------------------------------------------------------------
# The same on CUDA tensors: NCCL underneath


def _citizen_cuda_body(rank, w):
    import torch.distributed._functional_collectives as fc
    from torch.distributed.device_mesh import init_device_mesh

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    pg = dist.group.WORLD
    x = torch.arange(6.0, device=dev)
    recv = fc.wait_tensor(fc.all_to_all_single(x, None, None, group=pg))
    mesh = init_device_mesh("cuda", (w,))
    gathered = torch.empty(2 * w, device=dev)
    dist.all_gather_into_tensor(gathered, torch.tensor([1.0, 2.0], device=dev))
    scattered = torch.empty(2, device=dev)
    dist.reduce_scatter_tensor(scattered, torch.arange(2.0 * w, device=dev))
    torch.cuda.synchronize()
    stats = pg.channel_stats()["cuda:0"]
    return {
        "backend": type(pg._get_backend(dev)).__name__,
        "name": pg.group_name,
        "recv_ok": torch.equal(recv, x),
        "transport": stats["transport"],
        "posted": stats["posted"],
        "mesh": mesh.get_group() is pg,
        "gathered": gathered.tolist(),
        "scattered": scattered.tolist(),
    }


@pytest.mark.gpu
def test_cuda_tensors_get_nccl_underneath():
    got = run_world(1, _citizen_cuda_body, backend="bls", timeout_s=180)[0]
    assert got["backend"] == "ProcessGroupNCCL" and got["name"]
    assert got["recv_ok"] and got["transport"] == "nccl" and got["posted"] == 1
    assert got["mesh"] and got["gathered"] == [1.0, 2.0] and got["scattered"] == [0.0, 1.0]
