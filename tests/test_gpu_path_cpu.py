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
import itertools
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
from blsgpu import BoundedLagAllToAll, PeerError, run_world
from blsgpu.counters.device import DeviceCounters, HostOps
from blsgpu.exchange import channel as _exchange
from blsgpu.transport import gpu_path_available, nccl_lib
from blsgpu.transport import nccl as _nccl
from blsgpu.transport.local import current_group, run_local

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
    maps = "\n".join([
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6",
        "7f02-7f03 r-xp 00000000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2",
        "7f03-7f04 r--p 00001000 08:01 2 /site/nvidia/nccl/lib/libnccl.so.2",
        "7f05-7f06 r-xp 00000000 08:01 3 /opt/x/libnccl.so.2.27.3 (deleted)",
        "7f07-7f08 r-xp 00000000 08:01 4 /opt/x/libnccl-net.so",
        "7f09-7f0a rw-p 00000000 00:00 0 ",
    ])
    assert nccl_lib.loaded_libnccl(maps) == ["/site/nvidia/nccl/lib/libnccl.so.2",
                                             "/opt/x/libnccl.so.2.27.3"]
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
    from blsgpu.counters.device import host_wait  # noqa: PLC0415

    quick = _TimedEvent(20e-6)
    t0 = time.monotonic()
    assert host_wait(quick, 5.0) and time.monotonic() - t0 < 0.01  # caught while polling
    never = _TimedEvent(1e9)
    t0 = time.monotonic()
    assert not host_wait(never, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 0.5
    assert never.queries < 5000  # slept between polls after the first 50 us


def test_counter_blocks_are_distinct_zeroed_and_never_reused():
    from blsgpu.counters.device import _SLAB_BLOCKS, _counter_block  # noqa: PLC0415

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

    from blsgpu.counters.device import MemOps  # noqa: PLC0415

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
    """Runs its ops in order, each once the ones before it are done (driven by queries).
    `history` labels every op pushed, in order (what the tests read the stream's schedule from)."""

    def __init__(self, host: bool = False):
        self.q: deque = deque()
        self.lock = threading.RLock()
        self.host = host
        self.history: list = []

    def push(self, op: _Op, label=None) -> None:
        with self.lock:
            self.q.append(op)
            self.history.append(label)
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
    ids = itertools.count()

    def __init__(self, stream: FakeStream):
        self.stream, self.reached, self.id = stream, False, next(FakeEvent.ids)

        def mark():
            self.reached = True

        stream.push(_Op(start=mark), ("record", self.id))

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
            stream.push(_Op(done=event.query), ("wait", event.id))

    @staticmethod
    def copy_async(dst, src, stream):
        stream.push(_Op(start=lambda: dst.copy_(src)), ("copy",))

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

    def counters(self, world_size, rank, stream, timeout_s):
        # The gate's events are the fake's: release records on the caller's (host) stream, the
        # data stream waits for them.
        return DeviceCounters(world_size, rank, torch.device("cpu"), stream, timeout_s, HostOps(),
                              events=self)


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
        self.threads: dict = defaultdict(list)  # rank -> (thread name, comm name) per group
        self.ops: dict = defaultdict(list)  # (comm name, rank) -> its groups' ops (for abort)

    def groupStart(self):  # noqa: N802 (CuPy's names)
        self.tls.calls = []

    def groupEnd(self):  # noqa: N802
        calls, self.tls.calls = self.tls.calls, None
        if not calls:
            return
        streams = {id(c[5]) for c in calls}
        assert len(streams) == 1, "one stream per group here"
        comm, stream = calls[0][0], calls[0][5]
        if comm.aborted:
            raise RuntimeError("NCCL: a group on an aborted communicator")
        self.groups[(comm.name, comm.rank)] += 1
        self.threads[comm.rank].append((threading.current_thread().name, comm.name))
        op = _Op()
        self.ops[(comm.name, comm.rank)].append(op)
        op.pending = sum(1 for c in calls if not c[1])

        def start():
            for c, is_send, ptr, n, peer, _ in calls:
                if is_send:
                    self._send((c.name, c.rank, peer), ctypes.string_at(ptr, n))
                else:
                    self._recv((c.name, peer, c.rank), ptr, n, op)

        op._start, op._done = start, lambda: op.pending <= 0
        stream.push(op, ("group", comm.name))

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
        self.drop = False  # a rank whose sends never leave (silent on this communicator)

    def _check(self, ptr, n, dtype):
        assert dtype == FakeNccl.NCCL_UINT8 and self.nccl.tls.calls is not None, "outside a group"
        # NCCL reads and writes device memory only: a host pointer here would fail on a GPU.
        assert n == 0 or self.cuda.is_device(ptr, n), f"NCCL got host memory ({n} bytes)"

    def send(self, ptr, n, dtype, peer, stream):
        self._check(ptr, n, dtype)
        if not self.drop or peer == self.rank:
            self.nccl.tls.calls.append((self, True, ptr, n, peer, stream))

    def recv(self, ptr, n, dtype, peer, stream):
        self._check(ptr, n, dtype)
        self.nccl.tls.calls.append((self, False, ptr, n, peer, stream))

    def abort(self):
        # Like ncclCommAbort: the kernels of this communicator end, whatever they waited for.
        self.aborted = True
        for op in self.nccl.ops[(self.name, self.rank)]:
            op.pending = 0

    def destroy(self):
        self.destroyed = True


@pytest.fixture
def fake_nccl(monkeypatch):
    """Channels built with transport='nccl' inside run_local get NcclTransport over the fakes."""
    nccl = FakeNccl()
    built: dict = defaultdict(list)
    counters: dict = defaultdict(int)
    store = torch.distributed.HashStore()  # the group's store, shared by the ranks

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
            FakeComm(nccl, f"{ch}/header", rank, cuda), FakeComm(nccl, f"{ch}/data", rank, cuda),
            store=torch.distributed.PrefixStore(f"ch{ch}/", store))
        built[rank].append(t)
        return t

    monkeypatch.setattr(_exchange, "make_transport", make)
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
        return (e.peer, e.iteration, time.monotonic() - t0, str(e),
                a2a.transport.data_comm.aborted, a2a.transport.header_comm.aborted)
    return "no error"


def test_nccl_transport_aborts_and_raises_on_a_silent_peer(fake_nccl):
    results = run_local(3, _nccl_silent_body, timeout_s=30)
    assert results[2] == "slept"
    for r in (0, 1):
        peer, iteration, elapsed, msg, data_aborted, header_aborted = results[r]
        # Named through the store: the ranks that saw the failure said so, rank 2 did not.
        assert (peer, iteration) == (2, 0) and 0.8 < elapsed < 2.4 + 0.5
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


# ------------------------------------------------------------------------------------------------
# one issuing thread, one global order; the device gate; the watchdog; abort across threads


def _order_body(rank, w, bound, iters, seed):
    rng = np.random.default_rng([seed, rank])
    with BoundedLagAllToAll(bound=bound, timeout=30, transport="nccl", name="order") as a2a:
        pending = []
        for k in range(iters):
            g = np.random.default_rng([seed, k])
            m = g.integers(0, 4, size=(w, w)) * (g.random((w, w)) > 0.3)
            if k % 4 == 3:
                m[:] = 0  # no rank has data: no data group anywhere
            else:
                m[0, 1] = max(m[0, 1], 1)  # some rank has: a data group everywhere
            send = torch.ones(int(m[rank].sum()), 2)
            pending.append(a2a.exchange(send, m[rank].tolist()))
            time.sleep(float(rng.exponential(0.002)))  # each rank at its own pace
            if len(pending) > bound:
                pending.pop(0).wait()
        for h in pending:
            h.wait()
        return list(a2a.transport.issued)


@pytest.mark.parametrize("w,bound", [(3, 0), (3, 2), (4, 4)])
def test_every_rank_issues_its_groups_in_one_global_order_from_one_thread(fake_nccl, w, bound):
    nccl, built = fake_nccl
    iters = 24
    orders = run_local(w, _order_body, bound, iters, 17, timeout_s=60)
    # (communicator, kind, k) of every group the engine decided, in issue order: identical on
    # every rank, header of k before data of k before header of k+1.
    for rank in range(1, w):
        assert orders[rank] == orders[0], f"rank {rank} issued in another order"
    want = [("header", "connect", -1), ("data", "connect", -1)]
    for k in range(iters):
        want.append(("header", 0, k))
        if k % 4 != 3:
            want.append(("data", 1, k))
    assert orders[0] == want
    for rank in range(w):
        threads = nccl.threads[rank]
        # After connecting (the creating thread, once per communicator), every NCCL group of the
        # channel came from its progress thread alone.
        assert {t for t, _ in threads[2:]} == {f"blsgpu-order-r{rank}"}, set(threads[2:])


def _gate_body(rank, w, bound, iters):
    released = {}
    with BoundedLagAllToAll(bound=bound, timeout=30, transport="nccl") as a2a:
        pending = []
        for k in range(iters):
            pending.append((k, a2a.exchange(torch.full((2 * w, 3), float(k)), [2] * w)))
            if len(pending) > bound:
                k0, h = pending.pop(0)
                h.wait()
                # The event release(k0) recorded on the caller's stream (a gate takes it later).
                released[k0] = a2a._counters.release_events[k0].id
        for _, h in pending:
            h.wait()
        t = a2a.transport
        return released, list(t.data_stream.history), a2a._counters.gated_on


@pytest.mark.parametrize("bound", [0, 1, 3])
def test_data_of_k_waits_on_device_for_the_event_of_release_k_minus_b_minus_1(fake_nccl, bound):
    w, iters = 2, 12
    for released, history, gated_on in run_local(w, _gate_body, bound, iters, timeout_s=60):
        # Cut the data stream's schedule at its groups: the first connects, then one per k.
        segments, cur = [], []
        for label in history:
            if label and label[0] == "group":
                segments.append(cur)
                cur = []
            else:
                cur.append(label)
        assert len(segments) == 1 + iters
        for k in range(iters):
            waits = [lab[1] for lab in segments[1 + k] if lab[0] == "wait"]
            j = k - bound - 1
            if j >= 0:
                # The gate: a CUDA-visible wait for the consumer's release of k-B-1 ...
                assert released[j] in waits, (k, waits)
            # ... and nothing else but the wait for the caller's slot.
            assert len(waits) == (2 if j >= 0 else 1), (k, waits)
        assert gated_on == iters - bound - 2


def _dead_data_body(rank, w):
    a2a = BoundedLagAllToAll(bound=1, timeout=1.0, transport="nccl", name="dead-data")
    if rank == 2:
        a2a.transport.data_comm.drop = True  # its headers go; its data never does
        a2a.exchange(torch.ones(w, 4), [1] * w)
        time.sleep(4.0)  # then it hangs (a stopped process: it reports nothing)
        return "hung"
    t0 = time.monotonic()
    try:
        pending = []
        for _ in range(10):
            pending.append(a2a.exchange(torch.ones(w, 4), [1] * w))
            if len(pending) > 1:
                pending.pop(0).wait()
        for h in pending:
            h.wait(blocking=True)
    except PeerError as e:
        return (e.peer, e.iteration, e.channel, time.monotonic() - t0,
                a2a.transport.data_comm.aborted)
    finally:
        a2a._shutdown(abandon=True)
    return "no error"


def test_watchdog_names_a_peer_whose_data_never_comes(fake_nccl):
    results = run_local(3, _dead_data_body, timeout_s=60, return_exceptions=True)
    for r in (0, 1):
        assert isinstance(results[r], tuple), results[r]
        peer, iteration, channel, elapsed, aborted = results[r]
        # The data group of iteration 0 never completes: the watchdog sees it past the timeout,
        # the store names rank 2 (0 and 1 reported the failure), the communicators are aborted.
        assert (peer, channel) == (2, "dead-data") and 0 <= iteration < 10
        assert aborted and 0.9 < elapsed < 6.0


class _StuckComm(FakeComm):
    """A communicator whose send blocks inside the call until `go` is set."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.go, self.inside = threading.Event(), threading.Event()
        self.log: list[str] = []

    def send(self, ptr, n, dtype, peer, stream):
        self.inside.set()
        self.log.append("send enters")
        self.go.wait(10)
        self.log.append("send returns")
        super().send(ptr, n, dtype, peer, stream)

    def abort(self):
        self.log.append("abort")
        super().abort()


def _transport_pair(store, stuck=True):
    nccl, cuda = FakeNccl(), FakeCuda()
    comm = (_StuckComm if stuck else FakeComm)(nccl, "0/data", 0, cuda)
    t = _nccl.NcclTransport.from_parts(nccl, cuda, 0, 2, 0, FakeComm(nccl, "0/header", 0, cuda),
                                       comm, store=store)
    t.make_counters(2, 0, 1.0)
    return t, cuda, comm


def test_abort_from_another_thread_waits_for_a_call_inside_nccl_then_fails_every_wait():
    store = torch.distributed.HashStore()
    t, cuda, comm = _transport_pair(store)
    buf = cuda.empty((8,), torch.uint8)
    recv_work = t.irecv(cuda.empty((8,), torch.uint8), 1, 1, 0)
    t.isend(buf, 1, 1, 0)
    issuer = threading.Thread(target=t.flush, args=(1, 0))  # the progress thread, in NCCL
    issuer.start()
    assert comm.inside.wait(5)
    aborter = threading.Thread(target=t.abort)
    aborter.start()
    time.sleep(0.3)
    assert aborter.is_alive() and comm.log == ["send enters"]  # abort waits for the call
    comm.go.set()
    issuer.join(5)
    aborter.join(5)
    assert comm.log == ["send enters", "send returns", "abort"]
    assert t.header_comm.aborted and comm.aborted
    # Every later call and wait raises the abort, at once.
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="abandoned"):
        t.wait(recv_work, 10.0)
    with pytest.raises(RuntimeError, match="abandoned"):
        t.isend(buf, 1, 1, 1)
    assert time.monotonic() - t0 < 0.5


def _quietly(fn, *args):
    with contextlib.suppress(RuntimeError):  # a call aborted under it fails, as NCCL's does
        fn(*args)


def test_abort_ends_a_host_wait_in_another_thread_and_goes_ahead_past_a_stuck_call(monkeypatch):
    monkeypatch.setattr(_nccl, "_ABORT_GRACE_S", 0.3)
    t, cuda, comm = _transport_pair(torch.distributed.HashStore())
    # A header group that never completes (the peer is silent), waited on the host by one thread.
    t.irecv(torch.empty(16, dtype=torch.uint8), 1, 0, 0)
    t.flush(0, 0)
    work = t._watched[0]
    assert work.comm == "header"
    waited = []

    def waiter():
        t0 = time.monotonic()
        try:
            t.wait(_nccl._Work(0, 0, 1, torch.empty(16, dtype=torch.uint8), False,
                               event=work.end), 30.0)
        except RuntimeError as e:
            waited.append((time.monotonic() - t0, str(e)))

    w = threading.Thread(target=waiter)
    w.start()
    # Another thread stuck inside NCCL, forever as far as abort can tell.
    t.isend(cuda.empty((8,), torch.uint8), 1, 1, 0)
    stuck = threading.Thread(target=_quietly, args=(t.flush, 1, 0), daemon=True)
    stuck.start()
    assert comm.inside.wait(5)
    time.sleep(0.2)
    t0 = time.monotonic()
    t.abort()
    assert 0.25 < time.monotonic() - t0 < 2.0 and comm.log == ["send enters", "abort"]
    w.join(5)
    assert waited and waited[0][0] < 1.5 and "abandoned" in waited[0][1]
    comm.go.set()
    stuck.join(5)


def test_watchdog_fails_a_reached_group_past_the_timeout_and_not_one_behind_its_gate():
    t, cuda, _ = _transport_pair(None, stuck=False)
    t._timeout_s = 1.0
    gate_open = threading.Event()
    # The data stream is held by a gate (the consumer has not released yet), then a group that
    # never completes. Behind the gate, the group is not late however long it waits.
    t.data_stream.push(_Op(done=gate_open.is_set), ("wait", "gate"))
    t.irecv(cuda.empty((8,), torch.uint8), 1, 1, 0)
    t.flush(1, 0)
    for _ in range(3):
        time.sleep(0.5)
        t.watch_once()
    assert t._error is None  # 1.5 s > the timeout, all of it behind the gate
    gate_open.set()
    t.watch_once()  # the stream reached the group now: its clock starts
    time.sleep(0.3)
    t.watch_once()
    assert t._error is None
    time.sleep(1.0)
    t.watch_once()
    assert isinstance(t._error, blsgpu.errors.PeerFailure)
    msg = str(t._error)
    assert "data group of iteration 0" in msg and "could not be told apart" in msg
    assert t._error.peer is None and t.data_comm.aborted


def _known_body(rank, w, bound, iters, ask):
    bad = []
    with BoundedLagAllToAll(bound=bound, timeout=30, transport="nccl", name="known",
                            known_splits=ask[rank]) as a2a:
        pending = []
        for k in range(iters):
            g = np.random.default_rng([7, k])
            m = g.integers(0, 4, size=(w, w)) * (g.random((w, w)) > 0.3)
            send = torch.arange(int(m[rank].sum()) * 2, dtype=torch.int64).view(-1, 2) + 100 * rank
            pending.append((k, m, a2a.exchange(send, m[rank].tolist(), m[:, rank].tolist())))
            if len(pending) > bound:
                k0, m0, h = pending.pop(0)
                recv, splits = h.wait()
                want = torch.cat([
                    (torch.arange(int(m0[s].sum()) * 2, dtype=torch.int64).view(-1, 2) + 100 * s)
                    [int(m0[s, :rank].sum()): int(m0[s, : rank + 1].sum())] for s in range(w)])
                if splits != m0[:, rank].tolist() or not torch.equal(recv, want):
                    bad.append(k0)
        for _, _, h in pending:
            h.wait()
        refused = None
        if a2a._known:
            try:
                a2a.exchange(torch.ones(w), [1] * w)  # no recv_splits on a known-splits channel
            except ValueError as e:
                refused = str(e)
        return bad, list(a2a.transport.issued), a2a._known, refused, a2a.stats()


@pytest.mark.parametrize("bound", [0, 2])
def test_known_splits_channel_sends_no_header_on_the_gpu_path(fake_nccl, bound):
    nccl, built = fake_nccl
    w, iters = 3, 20
    results = run_local(w, _known_body, bound, iters, [True] * w, timeout_s=60)
    for rank, (bad, issued, known, refused, stats) in enumerate(results):
        assert bad == [] and known
        assert "known_splits=True" in refused
        # One group per iteration, the data's, on every rank alike; no header group at all.
        assert issued == results[0][1]
        assert issued[2:] == [("data", 1, k) for k in range(iters)]
        assert nccl.groups[("0/header", rank)] == 1  # connecting
        assert 0 <= stats["max_lag"] <= bound + 1


def test_known_splits_needs_every_rank_else_headers_travel(fake_nccl):
    nccl, built = fake_nccl
    w, iters = 3, 6
    results = run_local(w, _known_body, 1, iters, [True, False, True], timeout_s=60)
    for rank, (bad, issued, known, refused, _) in enumerate(results):
        assert bad == [] and not known and refused is None
        assert ("header", 0, iters - 1) in issued
        assert nccl.groups[("0/header", rank)] == iters + 1
