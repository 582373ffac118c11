"""A fake CUDA and NCCL that run on CPU, for the NCCL transport's logic without a GPU.

Streams are queues of ops that run in order as they are queried; NCCL's point-to-point calls match
per (communicator, source, destination) in order, as on a GPU, and a group's receives complete when
their sends arrive. install() makes channels asked for transport "nccl" inside run_local get the
real NcclTransport over these fakes.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading
import time
from collections import defaultdict, deque

import torch

from blsgpu.counters.device import DeviceCounters, HostOps
from blsgpu.exchange import channel as _exchange
from blsgpu.transport import nccl as _nccl
from blsgpu.transport.local import current_group


class Op:
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

    def push(self, op: Op, label=None) -> None:
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

        stream.push(Op(start=mark), ("record", self.id))

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
        return any(
            t.data_ptr() <= ptr and ptr + nbytes <= t.data_ptr() + t.nbytes for t in self.device_memory
        )

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
            stream.push(Op(done=event.query), ("wait", event.id))

    @staticmethod
    def copy_async(dst, src, stream):
        stream.push(Op(start=lambda: dst.copy_(src)), ("copy",))

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
        return DeviceCounters(
            world_size, rank, torch.device("cpu"), stream, timeout_s, HostOps(), events=self
        )


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

    def groupStart(self):  # CuPy's names
        self.tls.calls = []

    def groupEnd(self):
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
        op = Op()
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


def install(monkeypatch) -> tuple[FakeNccl, dict]:
    """Channels built with transport='nccl' inside run_local get NcclTransport over the fakes.
    Returns the fake NCCL and, per rank, the transports built (in channel order)."""
    nccl = FakeNccl()
    built: dict = defaultdict(list)
    counters: dict = defaultdict(int)
    store = torch.distributed.HashStore()  # the group's store, shared by the ranks

    def make(kind, group, device, timeout_s):
        g = current_group()
        if kind != "nccl" or g is None:
            raise AssertionError("the fake only builds nccl channels inside run_local")
        rank, w = g.rank(), g.size()
        ch = counters[(w, rank)]  # by world size too: runs of different sizes share the fakes
        counters[(w, rank)] += 1
        cuda = FakeCuda()
        t = _nccl.NcclTransport.from_parts(
            nccl,
            cuda,
            rank,
            w,
            ch,
            FakeComm(nccl, f"{ch}/header", rank, cuda),
            FakeComm(nccl, f"{ch}/data", rank, cuda),
            store=torch.distributed.PrefixStore(f"w{w}ch{ch}/", store),
        )
        built[rank].append(t)
        return t

    monkeypatch.setattr(_exchange, "make_transport", make)
    return nccl, built
