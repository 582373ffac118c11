"""What of the GPU path can be checked without a GPU.

- importing blsgpu (and running exchanges on CPU) loads neither CuPy, NCCL nor Triton;
- transport "auto" picks gloo without a GPU; "nccl" without CuPy names the extra to install;
- the libnccl mismatch message names both libraries; the NCCL unique id survives the store;
- torch.profiler shows the blsgpu ranges on CPU; NVTX is a no-op without the package;
- the device counters' logic (gate, release, timeout) over host-emulated stream operations.

The NCCL transport's own logic, over a fake CUDA and NCCL, is in tests/test_nccl_fakes.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch

import blsgpu
from blsgpu import BoundedLagAllToAll, run_world
from blsgpu.counters.device import DeviceCounters, HostOps
from blsgpu.transport import gpu_path_available, nccl_lib
from blsgpu.transport.local import run_local

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def _python(code: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# imports and transport choice


def test_import_and_cpu_exchanges_load_no_gpu_stack():
    code = """
import json, sys, torch
import blsgpu
from blsgpu.transport.local import run_local
def body(rank, w):
    with blsgpu.BoundedLagAllToAll(bound=1) as a2a:
        return a2a.exchange(torch.ones(w), [1] * w).wait()[0].tolist()
assert run_local(2, body) == [[1.0, 1.0]] * 2
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'cupy', 'cupy_backends', 'cuda', 'triton', 'nvtx'})
gpu = sorted(m for m in sys.modules if m in ('blsgpu.transport.nccl', 'blsgpu.counters.device'))
maps = [l for l in open('/proc/self/maps') if 'libnccl' in l]
print(json.dumps([heavy, gpu, len(maps)]))
"""
    heavy, gpu, nccl_maps = json.loads(_python(code))
    # nvtx is optional and would load only where installed; the rest must never load on CPU.
    assert [m for m in heavy if m != "nvtx"] == [] and gpu == [] and nccl_maps == 0


def _auto_body(rank, w):
    kinds = []
    for device in (None, "cpu", "cuda"):
        a2a = BoundedLagAllToAll(bound=1, device=device, transport="auto")
        kinds.append(a2a.stats()["transport"])
        a2a.close()
    return kinds


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice on a machine without GPU")
def test_auto_picks_gloo_without_a_gpu():
    assert run_world(2, _auto_body) == [["gloo"] * 3] * 2
    assert run_local(2, _local_kind) == ["local"] * 2


def _local_kind(rank, w):
    with BoundedLagAllToAll(bound=0) as a2a:
        return a2a.stats()["transport"]


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here")
def test_nccl_without_cupy_names_the_extra():
    with pytest.raises(ImportError, match=r"blsgpu\[cuda12\]") as info:
        BoundedLagAllToAll(transport="nccl")
    assert "CuPy" in str(info.value) and "blsgpu[cuda13]" in str(info.value)
    assert gpu_path_available() is False
    with pytest.raises(ValueError, match="transport must be"):
        BoundedLagAllToAll(transport="mpi")


# ------------------------------------------------------------------------------------------------
# libnccl, versions, unique ids


def test_libnccl_mismatch_names_both_libraries():
    torch_lib = "/env/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2"
    cupy_lib = "/opt/cupy/lib/libnccl.so.2.27.3"
    assert nccl_lib.libnccl_mismatch([torch_lib], [torch_lib], (2, 21, 5), 22105) is None
    assert nccl_lib.libnccl_mismatch([], [], None, 22703) is None  # nothing to compare
    msg = nccl_lib.libnccl_mismatch([torch_lib], [torch_lib, cupy_lib], (2, 21, 5), 22703)
    assert f"CuPy loaded {cupy_lib} (NCCL 2.27.3)" in msg
    assert f"torch uses {torch_lib} (NCCL 2.21.5)" in msg
    msg = nccl_lib.libnccl_mismatch([], [cupy_lib], (2, 21, 5), 22703)  # NCCL linked into torch
    assert "2.21.5" in msg and "linked into torch" in msg and cupy_lib in msg
    msg = nccl_lib.libnccl_mismatch([torch_lib, cupy_lib], [torch_lib, cupy_lib], (2, 21, 5), 22703)
    assert torch_lib in msg and cupy_lib in msg and "two libnccl" in msg


def test_loaded_libnccl_parses_maps_and_skips_plugins():
    maps = "\n".join(
        [
            "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6",
            "7f02-7f03 r-xp 00000000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2",
            "7f03-7f04 r--p 00001000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2",
            "7f05-7f06 r-xp 00000000 08:01 3 /opt/x/libnccl.so.2.27.3 (deleted)",
            "7f07-7f08 r-xp 00000000 08:01 4 /opt/x/libnccl-net.so",
            "7f09-7f0a rw-p 00000000 00:00 0 ",
        ]
    )
    assert nccl_lib.loaded_libnccl(maps) == ["/site/nvidia/nccl/lib/libnccl.so.2", "/opt/x/libnccl.so.2.27.3"]
    assert nccl_lib.nccl_version_str(22703) == "2.27.3"
    assert nccl_lib.nccl_version_str(2708) == "2.7.8"
    assert nccl_lib.nccl_version_str((2, 21, 5)) == "2.21.5"


def test_unique_id_survives_the_store():
    signed = tuple(((i * 37) % 256) - 128 for i in range(128))  # CuPy's chars on x86-64
    unsigned = tuple((i * 37) % 256 for i in range(128))  # ... where char is unsigned (aarch64)
    raw = bytes(range(128))  # bytes
    store = torch.distributed.HashStore()
    for key, uid in (("t", signed), ("u", unsigned), ("b", raw)):
        store.set(key, nccl_lib.uid_to_bytes(uid))
        assert nccl_lib.uid_from_bytes(store.get(key)) == uid
    with pytest.raises(ValueError, match="unique id"):
        nccl_lib.uid_from_bytes(b"x123")


# ------------------------------------------------------------------------------------------------
# traces


def _profile_body(rank, w):
    from torch.profiler import ProfilerActivity, profile

    # The channel closes inside the profile: close() waits for the last gloo sends, whose records
    # would otherwise complete in gloo's thread after the profiler stopped (that can crash torch).
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with BoundedLagAllToAll(bound=1, name="prof") as a2a:
            for _ in range(2):
                a2a.exchange(torch.ones(w, 4), [1] * w).wait()
    return sorted({e.name for e in prof.events() if e.name.startswith("blsgpu.")})


def test_torch_profiler_shows_post_wait_release_on_cpu():
    for names in run_world(2, _profile_body):
        for k in (0, 1):
            for what in ("post", "wait", "release"):
                assert f"blsgpu.{what}[prof:{k}]" in names, names


_FAKE_NVTX = """
import contextlib, json, sys, types
calls = []
fake = types.ModuleType('nvtx')
@contextlib.contextmanager
def annotate(message, domain=None):
    calls.append([message, domain]); yield
fake.annotate = annotate
sys.modules['nvtx'] = fake
from blsgpu._trace import span
with span('post', 'c', 3):
    pass
print(json.dumps(calls))
"""


def test_nvtx_ranges_when_present_and_noop_when_absent_or_off():
    import os

    assert json.loads(_python(_FAKE_NVTX)) == [["blsgpu.post[c:3]", "blsgpu"]]
    env = {**os.environ, "BLSGPU_NVTX": "0"}
    assert json.loads(_python(_FAKE_NVTX, env)) == []
    absent = (
        "import sys; sys.modules['nvtx'] = None\n"
        "from blsgpu import _trace\nwith _trace.span('wait', 'c', 1): pass\n"
        "print(_trace._nvtx is None and not _trace._NVTX)"
    )
    assert _python(absent) == "True"


# ------------------------------------------------------------------------------------------------
# device counters over host-emulated stream operations


class _LogEvents:
    """CUDA events as the gate uses them, logged: record(stream) and wait_event(stream, ev)."""

    def __init__(self):
        self.recorded, self.waits, self.n = [], [], 0

    @staticmethod
    def current_stream():
        return "consumer"

    def record(self, stream):
        self.n += 1
        self.recorded.append((stream, self.n))
        return self.n

    def wait_event(self, stream, ev):
        self.waits.append((stream, ev))


def test_device_gate_is_an_event_after_the_release_of_k_minus_b_minus_1():
    ev = _LogEvents()
    c = DeviceCounters(2, 0, torch.device("cpu"), "comm", timeout_s=5.0, ops=HostOps(), events=ev)
    c.gate(0, 2)
    c.gate(2, 2)  # k - B - 1 < 0: nothing to wait for
    assert ev.waits == [] and c.device_counts()["posted"] == 3
    c.release(0)
    c.release(1)
    assert ev.recorded == [("consumer", 1), ("consumer", 2)]  # on the consumer's stream
    c.gate(3, 2)  # iteration 3 at B=2: the comm stream waits for the release of 0
    c.gate(4, 2)
    assert ev.waits == [("comm", 1), ("comm", 2)] and c.gated_on == 1
    c.release(2)
    c.release(3)
    c.gate(6, 2)  # 5 moved no data (no gate): the event of release 2 is dropped, 3 waited on
    assert ev.waits[-1] == ("comm", 4) and c.release_events == {}
    assert c.device_counts() == {"posted": 7, "arrived": 0, "released": 4, "wait_timed_out": False}
    with pytest.raises(blsgpu.BLSError, match="release 4 recorded no event"):
        c.gate(7, 2)  # the engine never gates before the release: a bug, said loudly
    host = DeviceCounters(2, 0, torch.device("cpu"), None, timeout_s=5.0, ops=HostOps())
    host.gate(5, 0)  # CPU emulation: host order is the gate (no events, no wait)
    assert host.device_counts()["posted"] == 6
    assert host.extra_stats()["device"]["stream_ops"] == "host_emulation"


def test_host_ops_wait_still_times_out_and_flags_it():
    """The memory-op waits stay as diagnostics (perf/gpu_check.sh); their emulation times out."""
    ops = HostOps()
    cells = torch.zeros(2, dtype=torch.int64)
    t0 = time.monotonic()
    ops.wait_geq(None, cells.data_ptr(), 1, int(0.05e9), cells.data_ptr() + 8)
    assert time.monotonic() - t0 >= 0.04 and int(cells[1]) == 1


class _TimedEvent:
    """A CUDA event stand-in that completes at a given time, counting queries."""

    def __init__(self, after_s: float):
        self.at, self.queries = time.monotonic() + after_s, 0

    def query(self) -> bool:
        self.queries += 1
        return time.monotonic() >= self.at


def test_host_wait_returns_soon_after_the_event_and_does_not_spin():
    from blsgpu.counters.device import host_wait

    quick = _TimedEvent(20e-6)
    t0 = time.monotonic()
    assert host_wait(quick, 5.0) and time.monotonic() - t0 < 0.01  # caught while polling
    never = _TimedEvent(1e9)
    t0 = time.monotonic()
    assert not host_wait(never, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 0.5
    assert never.queries < 5000  # slept between polls after the first 50 us


def test_counter_blocks_are_distinct_zeroed_and_never_reused():
    from blsgpu.counters.device import _SLAB_BLOCKS, _counter_block

    blocks = [_counter_block(pinned=False) for _ in range(_SLAB_BLOCKS + 10)]  # spans two slabs
    addrs = {b.data_ptr() for b in blocks}
    assert len(addrs) == len(blocks) and all(b.tolist() == [0, 0, 0, 0] for b in blocks)
    del blocks
    assert _counter_block(pinned=False).data_ptr() not in addrs  # a late write lands nowhere new


class _FakeDriver:
    """cuda.bindings.driver's calls that MemOps makes, recording them."""

    def __init__(self, current: int, fail: bool = False):
        self.calls, self.current, self.fail = [], current, fail
        self.stack: list[int] = []
        self.CUstream = self.CUdeviceptr = self.cuuint64_t = int

    def cuDeviceGet(self, index):  # the driver's names
        return 0, index

    def cuDevicePrimaryCtxRetain(self, dev):
        return 0, 7  # the device's primary context

    def cuCtxGetCurrent(self):
        return 0, self.stack[-1] if self.stack else self.current

    def cuCtxPushCurrent(self, ctx):
        self.calls.append("push")
        self.stack.append(ctx)
        return (0,)

    def cuCtxPopCurrent(self):
        self.calls.append("pop")
        return 0, self.stack.pop()

    def cuStreamWriteValue64(self, stream, addr, value, flags):
        self.calls.append(("write", self.cuCtxGetCurrent()[1], stream, addr, value, flags))
        return (701 if self.fail else 0,)

    def cuGetErrorString(self, err):
        return 0, b"an illegal instruction was encountered"


def test_stream_mem_ops_leave_the_threads_current_context_alone():
    from types import SimpleNamespace

    from blsgpu.counters.device import MemOps

    stream = SimpleNamespace(cuda_stream=1234)
    other = _FakeDriver(current=3)  # another device's context is current in this thread
    MemOps(other, 0).write(stream, 4096, 5)
    assert other.calls == ["push", ("write", 7, 1234, 4096, 5, 0), "pop"] and other.stack == []
    same = _FakeDriver(current=7)  # already current: no push
    MemOps(same, 0).write(stream, 4096, 6)
    assert same.calls == [("write", 7, 1234, 4096, 6, 0)]
    bad = _FakeDriver(current=0, fail=True)  # none current; the driver refuses the write
    with pytest.raises(RuntimeError, match="CUresult 701 .an illegal instruction"):
        MemOps(bad, 0).write(stream, 4096, 7)
    assert bad.calls[-1] == "pop" and bad.stack == []
