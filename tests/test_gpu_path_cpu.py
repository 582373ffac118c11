"""What of the GPU path can be checked without a GPU.

- importing blsgpu (and running exchanges on CPU) loads neither CuPy, NCCL nor Triton;
- transport "auto" picks gloo without a GPU; "nccl" without CuPy names the extra to install;
- the libnccl mismatch message names both libraries; the NCCL unique id survives the store;
- torch.profiler shows the blsgpu ranges on CPU; NVTX is a no-op without the package;
- the device counters' logic (gate, release, timeout) over host-emulated stream operations;
- the NCCL transport's own logic (one group per iteration and kind, header staging, loopback, event
  hand-over, record_stream, abort on timeout) through the real engine, over a fake CUDA and NCCL
  that run streams and matching on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque

import numpy as np
import pytest
import torch

import blsgpu
from blsgpu import BoundedLagAllToAll, PeerError, _exchange, _nccl, run_world
from blsgpu._device_counters import DeviceCounters, HostOps
from blsgpu._local import current_group, run_local

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def _python(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# imports and transport choice


def test_import_and_cpu_exchanges_load_no_gpu_stack():
    code = """
import json, sys, torch
import blsgpu
from blsgpu._local import run_local
def body(rank, w):
    with blsgpu.BoundedLagAllToAll(bound=1) as a2a:
        return a2a.exchange(torch.ones(w), [1] * w).wait()[0].tolist()
assert run_local(2, body) == [[1.0, 1.0]] * 2
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'cupy', 'cupy_backends', 'cuda', 'triton', 'nvtx'})
gpu = sorted(m for m in sys.modules if m in ('blsgpu._nccl', 'blsgpu._device_counters'))
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
    assert _exchange._gpu_path_available() is False
    with pytest.raises(ValueError, match="transport must be"):
        BoundedLagAllToAll(transport="mpi")


# ------------------------------------------------------------------------------------------------
# libnccl, versions, unique ids


def test_libnccl_mismatch_names_both_libraries():
    torch_lib = "/env/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2"
    cupy_lib = "/opt/cupy/lib/libnccl.so.2.27.3"
    assert _nccl.libnccl_mismatch([torch_lib], [torch_lib], (2, 21, 5), 22105) is None
    assert _nccl.libnccl_mismatch([], [], None, 22703) is None  # nothing to compare
    msg = _nccl.libnccl_mismatch([torch_lib], [torch_lib, cupy_lib], (2, 21, 5), 22703)
    assert f"CuPy loaded {cupy_lib} (NCCL 2.27.3)" in msg
    assert f"torch uses {torch_lib} (NCCL 2.21.5)" in msg
    msg = _nccl.libnccl_mismatch([], [cupy_lib], (2, 21, 5), 22703)  # NCCL linked into torch
    assert "2.21.5" in msg and "linked into torch" in msg and cupy_lib in msg
    msg = _nccl.libnccl_mismatch([torch_lib, cupy_lib], [torch_lib, cupy_lib], (2, 21, 5), 22703)
    assert torch_lib in msg and cupy_lib in msg and "two libnccl" in msg


def test_loaded_libnccl_parses_maps_and_skips_plugins():
    maps = "\n".join([
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6",
        "7f02-7f03 r-xp 00000000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2",
        "7f03-7f04 r--p 00001000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2",
        "7f05-7f06 r-xp 00000000 08:01 3 /opt/x/libnccl.so.2.27.3 (deleted)",
        "7f07-7f08 r-xp 00000000 08:01 4 /opt/x/libnccl-net.so",
        "7f09-7f0a rw-p 00000000 00:00 0 ",
    ])
    assert _nccl.loaded_libnccl(maps) == ["/site/nvidia/nccl/lib/libnccl.so.2",
                                          "/opt/x/libnccl.so.2.27.3"]
    assert _nccl.nccl_version_str(22703) == "2.27.3"
    assert _nccl.nccl_version_str(2708) == "2.7.8"
    assert _nccl.nccl_version_str((2, 21, 5)) == "2.21.5"


def test_unique_id_survives_the_store():
    signed = tuple(((i * 37) % 256) - 128 for i in range(128))  # CuPy's chars on x86-64
    unsigned = tuple((i * 37) % 256 for i in range(128))  # ... where char is unsigned (aarch64)
    raw = bytes(range(128))  # bytes
    store = torch.distributed.HashStore()
    for key, uid in (("t", signed), ("u", unsigned), ("b", raw)):
        store.set(key, _nccl.uid_to_bytes(uid))
        assert _nccl.uid_from_bytes(store.get(key)) == uid
    with pytest.raises(ValueError, match="unique id"):
        _nccl.uid_from_bytes(b"x123")


# ------------------------------------------------------------------------------------------------
# traces


def _profile_body(rank, w):
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

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
    import os  # noqa: PLC0415

    assert json.loads(_python(_FAKE_NVTX)) == [["blsgpu.post[c:3]", "blsgpu"]]
    env = {**os.environ, "BLSGPU_NVTX": "0"}
    assert json.loads(_python(_FAKE_NVTX, env)) == []
    absent = ("import sys; sys.modules['nvtx'] = None\n"
              "from blsgpu import _trace\nwith _trace.span('wait', 'c', 1): pass\n"
              "print(_trace._nvtx is None and not _trace._NVTX)")
    assert _python(absent) == "True"


# ------------------------------------------------------------------------------------------------
# device counters over host-emulated stream operations


def test_device_counters_gate_waits_for_the_release_and_times_out():
    c = DeviceCounters(2, 0, torch.device("cpu"), None, timeout_s=5.0, ops=HostOps())
    c.gate(0, 2)  # k - B <= 0: nothing to wait for
    c.gate(2, 2)
    assert c.device_counts()["posted"] == 3
    released_at = []

    def consumer():
        time.sleep(0.3)
        released_at.append(time.monotonic())
        c.release(0)  # released = 1

    threading.Thread(target=consumer).start()
    t0 = time.monotonic()
    c.gate(3, 2)  # posting iteration 3 at B=2 needs released >= 1
    assert time.monotonic() >= released_at[0] and time.monotonic() - t0 > 0.25
    c.arrive(3)
    assert c.device_counts() == {"posted": 4, "arrived": 4, "released": 1, "wait_timed_out": False}
    assert c.extra_stats()["device"]["stream_ops"] == "host_emulation"
    quick = DeviceCounters(2, 0, torch.device("cpu"), None, timeout_s=0.05, ops=HostOps())
    quick.gate(5, 0)  # released never reaches 5: the wait gives up and flags it
    assert quick.device_counts()["wait_timed_out"]
    with pytest.raises(blsgpu.BLSError, match="timed out"):
        quick.gate(6, 0)


class _TimedEvent:
    """A CUDA event stand-in that completes at a given time, counting queries."""

    def __init__(self, after_s: float):
        self.at, self.queries = time.monotonic() + after_s, 0

    def query(self) -> bool:
        self.queries += 1
        return time.monotonic() >= self.at


def test_host_wait_returns_soon_after_the_event_and_does_not_spin():
    from blsgpu._device_counters import host_wait  # noqa: PLC0415

    quick = _TimedEvent(20e-6)
    t0 = time.monotonic()
    assert host_wait(quick, 5.0) and time.monotonic() - t0 < 0.01  # caught while polling
    never = _TimedEvent(1e9)
    t0 = time.monotonic()
    assert not host_wait(never, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 0.5
    assert never.queries < 5000  # slept between polls after the first 50 us


def test_counter_blocks_are_distinct_zeroed_and_never_reused():
    from blsgpu._device_counters import _SLAB_BLOCKS, _counter_block  # noqa: PLC0415

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

    def cuDeviceGet(self, index):  # noqa: N802 (the driver's names)
        return 0, index

    def cuDevicePrimaryCtxRetain(self, dev):  # noqa: N802
        return 0, 7  # the device's primary context

    def cuCtxGetCurrent(self):  # noqa: N802
        return 0, self.stack[-1] if self.stack else self.current

    def cuCtxPushCurrent(self, ctx):  # noqa: N802
        self.calls.append("push")
        self.stack.append(ctx)
        return (0,)

    def cuCtxPopCurrent(self):  # noqa: N802
        self.calls.append("pop")
        return 0, self.stack.pop()

    def cuStreamWriteValue64(self, stream, addr, value, flags):  # noqa: N802
        self.calls.append(("write", self.cuCtxGetCurrent()[1], stream, addr, value, flags))
        return (701 if self.fail else 0,)

    def cuGetErrorString(self, err):  # noqa: N802
        return 0, b"an illegal instruction was encountered"


def test_stream_mem_ops_leave_the_threads_current_context_alone():
    from types import SimpleNamespace  # noqa: PLC0415

    from blsgpu._device_counters import MemOps  # noqa: PLC0415

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


# ------------------------------------------------------------------------------------------------
# the NCCL transport over a fake CUDA and NCCL


class _Op:
    """One entry of a fake stream; `start` runs when the stream reaches it."""

    def __init__(self, start=None, done=None):
        self._start, self._done, self.started = start, done, False

    def start(self):
        self.started = True
        if self._start:
            self._start()

    def done(self):
        return self._done() if self._done else True


class FakeStream:
    """Runs its ops in order, each once the ones before it are done (driven by queries)."""

    def __init__(self, host: bool = False):
        self.q: deque = deque()
        self.lock = threading.RLock()
        self.host = host

    def push(self, op: _Op) -> None:
        with self.lock:
            self.q.append(op)
        self.progress()

    def progress(self) -> None:
        with self.lock:
            while self.q:
                op = self.q[0]
                if not op.started:
                    op.start()
                if not op.done():
                    return
                self.q.popleft()


class FakeEvent:
    def __init__(self, stream: FakeStream):
        self.stream, self.reached = stream, False

        def mark():
            self.reached = True

        stream.push(_Op(start=mark))

    def query(self) -> bool:
        self.stream.progress()
        return self.reached


class FakeCuda:
    """The TorchCuda adapter on CPU: the caller's stream is the host, the comm streams are queues."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.host = FakeStream(host=True)
        self.recorded = []  # (tensor data_ptr, stream) of record_stream calls
        self.device_memory = []  # what empty() handed out (kept alive: addresses stay unique)

    def is_device(self, ptr: int, nbytes: int) -> bool:
        """Whether [ptr, ptr + nbytes) lies in "device" memory (what empty() allocated)."""
        return any(t.data_ptr() <= ptr and ptr + nbytes <= t.data_ptr() + t.nbytes
                   for t in self.device_memory)

    def new_stream(self):
        return FakeStream()

    def current_stream(self):
        return self.host

    def use(self, stream):
        return contextlib.nullcontext()

    @staticmethod
    def handle(stream):
        return stream

    @staticmethod
    def record(stream):
        return FakeEvent(stream)

    def wait_event(self, stream, event):
        if stream.host:  # the host is the caller's stream: it waits right here
            assert self.host_wait(event, 30.0), "fake host stream waited 30 s"
        else:
            stream.push(_Op(done=event.query))

    @staticmethod
    def copy_async(dst, src, stream):
        stream.push(_Op(start=lambda: dst.copy_(src)))

    def record_stream(self, t, stream):
        self.recorded.append((t.data_ptr(), stream))

    @staticmethod
    def host_wait(event, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not event.query():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    @staticmethod
    def pinned(nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty(self, shape, dtype):
        t = torch.empty(shape, dtype=dtype)
        self.device_memory.append(t)
        return t

    @staticmethod
    def counters(world_size, rank, stream, timeout_s):
        return DeviceCounters(world_size, rank, torch.device("cpu"), stream, timeout_s, HostOps())


class FakeNccl:
    """cupy.cuda.nccl on CPU: groups per thread; sends and receives match per (comm, src, dst) in
    order, like NCCL's point-to-point; a group's receives complete when their sends arrive."""

    NCCL_UINT8 = 1

    def __init__(self):
        self.tls = threading.local()
        self.lock = threading.Lock()
        self.sends: dict = defaultdict(deque)
        self.recvs: dict = defaultdict(deque)
        self.groups: dict = defaultdict(int)  # (comm name, rank) -> groups launched

    def groupStart(self):  # noqa: N802 (CuPy's names)
        self.tls.calls = []

    def groupEnd(self):  # noqa: N802
        calls, self.tls.calls = self.tls.calls, None
        if not calls:
            return
        streams = {id(c[5]) for c in calls}
        assert len(streams) == 1, "one stream per group here"
        comm, stream = calls[0][0], calls[0][5]
        self.groups[(comm.name, comm.rank)] += 1
        op = _Op()
        op.pending = sum(1 for c in calls if not c[1])

        def start():
            for c, is_send, ptr, n, peer, _ in calls:
                if is_send:
                    self._send((c.name, c.rank, peer), ctypes.string_at(ptr, n))
                else:
                    self._recv((c.name, peer, c.rank), ptr, n, op)

        op._start, op._done = start, lambda: op.pending == 0
        stream.push(op)

    def _send(self, key, data):
        with self.lock:
            if self.recvs[key]:
                self._deliver(data, *self.recvs[key].popleft())
            else:
                self.sends[key].append(data)

    def _recv(self, key, ptr, n, op):
        with self.lock:
            if self.sends[key]:
                self._deliver(self.sends[key].popleft(), ptr, n, op)
            else:
                self.recvs[key].append((ptr, n, op))

    @staticmethod
    def _deliver(data, ptr, n, op):
        assert len(data) == n, f"NCCL would fail: {len(data)} bytes sent, {n} received"
        ctypes.memmove(ptr, data, n)
        op.pending -= 1


class FakeComm:
    def __init__(self, nccl: FakeNccl, name: str, rank: int, cuda: FakeCuda):
        self.nccl, self.name, self.rank, self.cuda = nccl, name, rank, cuda
        self.aborted = self.destroyed = False

    def _check(self, ptr, n, dtype):
        assert dtype == FakeNccl.NCCL_UINT8 and self.nccl.tls.calls is not None, "outside a group"
        # NCCL reads and writes device memory only: a host pointer here would fail on a GPU.
        assert n == 0 or self.cuda.is_device(ptr, n), f"NCCL got host memory ({n} bytes)"

    def send(self, ptr, n, dtype, peer, stream):
        self._check(ptr, n, dtype)
        self.nccl.tls.calls.append((self, True, ptr, n, peer, stream))

    def recv(self, ptr, n, dtype, peer, stream):
        self._check(ptr, n, dtype)
        self.nccl.tls.calls.append((self, False, ptr, n, peer, stream))

    def abort(self):
        self.aborted = True

    def destroy(self):
        self.destroyed = True


@pytest.fixture
def fake_nccl(monkeypatch):
    """Channels built with transport='nccl' inside run_local get NcclTransport over the fakes."""
    nccl = FakeNccl()
    built: dict = defaultdict(list)
    counters: dict = defaultdict(int)

    def make(kind, group, device, timeout_s):
        g = current_group()
        if kind != "nccl" or g is None:
            raise AssertionError("the fake only builds nccl channels inside run_local")
        rank, w = g.rank(), g.size()
        ch = counters[rank]
        counters[rank] += 1
        cuda = FakeCuda()
        t = _nccl.NcclTransport.from_parts(
            nccl, cuda, rank, w, ch,
            FakeComm(nccl, f"{ch}/header", rank, cuda), FakeComm(nccl, f"{ch}/data", rank, cuda))
        built[rank].append(t)
        return t

    monkeypatch.setattr(_exchange, "_make_transport", make)
    return nccl, built


def _nccl_body(rank, w, bound, iters, seed):
    bad, busy, handed = [], 0, 0
    with BoundedLagAllToAll(bound=bound, timeout=30, transport="nccl") as a2a:
        pending = []
        for k in range(iters):
            g = np.random.default_rng([seed, k])
            m = g.integers(0, 5, size=(w, w)) * (g.random((w, w)) > 0.25)
            n = int(m[rank].sum())
            busy += bool(n or m[:, rank].sum())  # iterations with data to or from this rank
            handed += int((m[:, rank] > 0).sum())  # data receives handed to the caller's stream
            send = torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 1000 * rank + 10**5 * k
            pending.append((k, m, a2a.exchange(send, m[rank].tolist(),
                                               m[:, rank].tolist() if k % 3 == 0 else None)))
            if len(pending) > bound:
                k0, m0, h = pending.pop(0)
                recv, splits = h.wait(blocking=k0 % 4 == 1)
                want = torch.cat([
                    (torch.arange(int(m0[s].sum()) * 3, dtype=torch.float32).view(-1, 3)
                     + 1000 * s + 10**5 * k0)[int(m0[s, :rank].sum()): int(m0[s, : rank + 1].sum())]
                    for s in range(w)])
                if splits != m0[:, rank].tolist() or not torch.equal(recv, want):
                    bad.append(k0)
        for _, _, h in pending:
            h.wait()
        return bad, a2a.stats(), busy, handed


@pytest.mark.parametrize("w,bound", [(1, 2), (3, 0), (3, 2)])
def test_nccl_transport_logic_over_fakes(fake_nccl, w, bound):
    nccl, built = fake_nccl
    iters = 25
    results = run_local(w, _nccl_body, bound, iters, 5, timeout_s=60)
    for rank, (bad, stats, busy, handed) in enumerate(results):
        assert bad == [], f"rank {rank}: {bad}"
        assert stats["transport"] == "nccl"
        dev = stats["device"]
        assert (dev["posted"], dev["arrived"], dev["released"]) == (iters, iters, iters)
        # One NCCL group per iteration on each communicator: headers wherever there are peers
        # (a rank's own header does not travel: none at W=1), data where any moves to or from
        # this rank (the rest of the test data has zero rows); plus the one that connects every
        # pair when the channel is created.
        assert nccl.groups[("0/header", rank)] == (iters if w > 1 else 0) + 1
        assert nccl.groups[("0/data", rank)] == busy + 1
        t = built[rank][0]
        assert t._pending == {} and t._slot_ready == {}
        assert t.header_comm.destroyed and t.data_comm.destroyed and not t.data_comm.aborted
        # record_stream: each data send on the data stream; every handed-over receive on the
        # caller's stream (the host stream of the fake), blocking waits included.
        on_data = sum(1 for _, s in t._cuda.recorded if s is t.data_stream)
        on_caller = sum(1 for _, s in t._cuda.recorded if s is t._cuda.host)
        assert on_data > 0 and on_caller == handed


def _nccl_silent_body(rank, w):
    a2a = BoundedLagAllToAll(bound=1, timeout=1.0, transport="nccl", name="nccl-quiet")
    if rank == 2:
        time.sleep(2.5)  # never posts
        return "slept"
    t0 = time.monotonic()
    try:
        a2a.exchange(torch.ones(w), [1] * w).wait()
    except PeerError as e:
        return (e.iteration, time.monotonic() - t0, str(e), a2a.transport.data_comm.aborted,
                a2a.transport.header_comm.aborted)
    return "no error"


def test_nccl_transport_aborts_and_raises_on_a_silent_peer(fake_nccl):
    results = run_local(3, _nccl_silent_body, timeout_s=30)
    assert results[2] == "slept"
    for r in (0, 1):
        iteration, elapsed, msg, data_aborted, header_aborted = results[r]
        assert iteration == 0 and 0.8 < elapsed < 2.4
        assert "timed out" in msg and "nccl-quiet" in msg
        assert data_aborted and header_aborted


def _nccl_absent_body(rank, w):
    if rank == 2:
        time.sleep(2.0)  # never creates its channel
        return "absent"
    t0 = time.monotonic()
    try:
        BoundedLagAllToAll(bound=1, timeout=1.0, transport="nccl")
    except TimeoutError as e:
        return str(e), time.monotonic() - t0
    return "created"


def test_nccl_channel_creation_times_out_when_a_rank_never_connects(fake_nccl):
    nccl, built = fake_nccl
    results = run_local(3, _nccl_absent_body, timeout_s=30)
    assert results[2] == "absent"
    for r in (0, 1):
        msg, elapsed = results[r]
        assert "could not connect all 3 ranks within 1.0 s" in msg and 0.8 < elapsed < 2.5
        t = built[r][0]
        assert t.header_comm.aborted and t.data_comm.aborted
