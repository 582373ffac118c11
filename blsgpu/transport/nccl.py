"""The GPU transport: NCCL point-to-point through CuPy, on comm streams that the channel owns.

A channel holds two NCCL communicators, each with its own stream: one for headers and one for data,
so that the headers of iteration k+1 can travel while the data of k is still gated or moving. One
thread issues to both, the engine's progress thread, in one order on every rank: the header group of
k, then (once its headers were read) the data group of k, then the header group of k+1 (NCCL asks
for one global order of operations across communicators; `issued` keeps the latest ones). Per
iteration k:

  flush(HEADER, k)  one group of every header send and receive on the header stream, staged through
                    pinned memory; the progress thread waits for it on the host (with a timeout).
  flush(DATA, k)    the data stream waits for the event where the caller's stream finished the send
                    slot and for the device gate that the engine enqueued there (an event after the
                    consumer's release of k-B-1), then runs one group of every data send and receive.
  order(work)       the caller's current stream waits on the group's event, and record_stream keeps
                    the caching allocator from handing out a buffer that NCCL still reads or writes;
                    wait(work) blocks the host instead (headers, close(), blocking waits).

A watchdog thread bounds every device wait by the channel's timeout: a group that its stream has
reached (an event recorded just before it completed) but that has not completed within the timeout
fails the channel. Every rank whose group fails says so in the group's store and waits a short grace
for the others; the peers that never say so are named (PeerError, as on CPU), and the communicators
are aborted, which ends the kernels that wait for the dead peer. Host waits time out the same way.
Aborting is safe from any thread: NCCL calls are made under one lock, and abort takes it (or, if a
thread is stuck inside NCCL for longer than a grace, aborts anyway: that is what ncclCommAbort is for).

A rank also messages itself through NCCL (loopback), so one GPU runs the whole path at W=1.
Loading CuPy's NCCL and creating the communicators is nccl_lib.py's job; every CUDA call goes
through TorchCuda, which the CPU tests replace with a fake.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist

from blsgpu.errors import PeerFailure
from blsgpu.transport.base import (
    HEADER,
    PointToPoint,
    blame_grace,
    blame_through_store,
    group_store,
    next_channel_id,
)
from blsgpu.transport.nccl_lib import import_nccl, make_comm
from blsgpu.transport.sizes import offsets
from blsgpu.transport.torch_cuda import TorchCuda
from blsgpu.transport.watchdog import Watchdog


@dataclass(eq=False)
class _Work:
    kind: int
    k: int
    peer: int
    buf: torch.Tensor
    send: bool
    event: Any = None  # the group's event once flushed
    staged: torch.Tensor | None = None  # header receives: pinned host bytes to copy into buf
    keep: Any = None  # staging buffers the group reads or writes, alive until it is waited


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_ABORT_GRACE_S = 5.0  # how long abort waits for a thread inside an NCCL call before aborting anyway


class NcclTransport(PointToPoint):
    """NCCL point-to-point for one channel (see the module docstring)."""

    name = "nccl"
    loopback = True
    stream_ordered = True
    caller_may_receive = False  # the progress thread alone issues and receives

    def __init__(self, group: Any = None, device: torch.device | str | None = None):
        nccl = import_nccl()  # first: without CuPy the error names the extra to install
        if not torch.cuda.is_available():
            raise RuntimeError("transport 'nccl' needs a CUDA GPU; none is visible")
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.type != "cuda":
            raise ValueError(f"transport 'nccl' needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call dist.init_process_group first "
                "(its store carries the NCCL unique id)"
            )
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        channel_id = next_channel_id(pg)
        store = group_store(group)
        prefix = f"blsgpu/nccl/{channel_id}"
        comms = [
            make_comm(nccl, store, f"{prefix}/{what}", rank, world_size, device.index)
            for what in ("header", "data")
        ]
        self._setup(
            nccl,
            TorchCuda(device),
            rank,
            world_size,
            channel_id,
            *comms,
            store=dist.PrefixStore(f"{prefix}/", store),
        )
        self._shared = store  # failures reported group-wide (see blame_through_store)

    @classmethod
    def from_parts(
        cls,
        nccl: Any,
        cuda: Any,
        rank: int,
        world_size: int,
        channel_id: int,
        header_comm: Any,
        data_comm: Any,
        store: Any = None,
    ) -> NcclTransport:
        """A transport over given communicators and CUDA adapter (tests drive it with fakes).
        `store` (the channel's keys in a store the ranks share) carries agreements and names the
        silent peers of a failure; None: no agreement (agree_min gives 0), failures unnamed."""
        self = cls.__new__(cls)
        self._setup(nccl, cuda, rank, world_size, channel_id, header_comm, data_comm, store)
        return self

    def _setup(
        self,
        nccl: Any,
        cuda: Any,
        rank: int,
        world_size: int,
        channel_id: int,
        header_comm: Any,
        data_comm: Any,
        store: Any = None,
    ) -> None:
        self._nccl = nccl
        self._cuda = cuda
        self.device = cuda.device
        self.rank, self.world_size, self.channel_id = rank, world_size, channel_id
        self.header_comm, self.data_comm = header_comm, data_comm
        self.header_stream = cuda.new_stream()
        self.data_stream = cuda.new_stream()
        self._pending: dict[tuple[int, int], list[_Work]] = {}  # (kind, k) -> posted, not launched
        self._slot_ready: dict[int, Any] = {}
        self._last_order: tuple[int, Any] | None = None  # (stream, event): holds the event
        self._error: BaseException | None = None
        self._closed = False
        self._store = store
        self._shared: Any = None
        self._agreements = 0
        self._timeout_s = 300.0
        self._counters: Any = None
        # Every NCCL call is made under this lock; abort() takes it too (see _abort).
        self._lock = threading.RLock()
        self._aborted = False
        self._fail_lock = threading.Lock()
        # (communicator, kind, k) of the latest groups, in issue order ("connect" at creation).
        self.issued: collections.deque = collections.deque(maxlen=256)
        self.watchdog = Watchdog(self._timeout_s, self._late, f"blsgpu-nccl{channel_id}-watchdog-r{rank}")

    # -- what the engine calls ---------------------------------------------------------------

    def connect(self, timeout_s: float) -> None:
        """Connect every pair now: one group of 1-byte messages per communicator, waited on.

        NCCL connects lazily inside a pair's first group. Done here, the host waits for it with a
        timeout (a peer that never comes is an error at channel creation, not a hang later). Then
        the watchdog starts.
        """
        self._timeout_s = timeout_s
        cuda, w = self._cuda, self.world_size
        for comm, stream, what in (
            (self.header_comm, self.header_stream, "header"),
            (self.data_comm, self.data_stream, "data"),
        ):
            with cuda.use(stream):
                out, into = cuda.empty((w,), torch.uint8), cuda.empty((w,), torch.uint8)
            self.issued.append((what, "connect", -1))
            self._group(
                comm,
                stream,
                [(p, out[p : p + 1]) for p in range(w)],
                [(p, into[p : p + 1]) for p in range(w)],
            )
            if not cuda.host_wait(cuda.record(stream), timeout_s):
                # The ranks that never report this failure are the ones that never connected.
                silent, sure = self._blame_store(-1, blame_grace(timeout_s))
                who = f"rank(s) {silent} did not" if sure and silent else "a rank did not"
                err = PeerFailure(
                    f"NCCL could not connect all {w} ranks within {timeout_s:.1f} s ({who} create "
                    f"the channel, or the network is unreachable)",
                    silent[0] if sure and silent else -1,
                    reason=PeerFailure.TIMED_OUT,
                )
                self._abort(err)
                raise err
        self.watchdog.timeout_s = timeout_s
        self.watchdog.start()

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks (collective, at channel creation), through the
        store; 0 where there is none."""
        if self.world_size == 1:
            return value
        if self._store is None:
            return 0
        n = self._agreements
        self._agreements += 1
        keys = [f"agree/{n}/{p}" for p in range(self.world_size)]
        self._store.set(keys[self.rank], str(int(value)))
        try:
            self._store.wait(keys, timedelta(seconds=self._timeout_s))
        except Exception as e:
            missing = [p for p, key in enumerate(keys) if not self._store.check([key])]
            raise PeerFailure(
                f"rank(s) {missing} did not agree on the channel's options within {self._timeout_s:.1f} s",
                missing[0] if missing else None,
                reason=PeerFailure.TIMED_OUT,
            ) from e
        return min(int(self._store.get(key)) for key in keys)

    def make_counters(self, world_size: int, rank: int, timeout_s: float) -> Any:
        self._timeout_s = self.watchdog.timeout_s = timeout_s
        self._counters = self._cuda.counters(world_size, rank, self.data_stream, timeout_s)
        return self._counters

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._cuda.use(self.data_stream):  # NCCL writes it on this stream: allocate here
            return self._cuda.empty(shape, dtype)

    def slot_written(self, k: int) -> None:
        """exchange(k) filled its send slot on the caller's current stream: the data group of k
        waits for this event on the data stream."""
        self._slot_ready[k] = self._cuda.record(self._cuda.current_stream())

    def isend(self, buf: torch.Tensor, peer: int, kind: int, k: int) -> _Work:
        return self._post(_Work(kind, k, peer, buf, True))

    def irecv(self, buf: torch.Tensor, peer: int, kind: int, k: int) -> _Work:
        return self._post(_Work(kind, k, peer, buf, False))

    def _post(self, work: _Work) -> _Work:
        self._check()
        if not work.buf.is_contiguous():
            raise ValueError("NCCL buffers must be contiguous")
        if not 0 <= work.peer < self.world_size:
            raise ValueError(f"rank {work.peer} is not in a world of {self.world_size}")
        self._pending.setdefault((work.kind, work.k), []).append(work)
        return work

    def flush(self, kind: int, k: int) -> None:
        self._check()
        works = self._pending.pop((kind, k), [])
        # Logged even when this rank has nothing to send or receive: the engine's decision, the
        # same on every rank (the order the tests compare across ranks).
        self.issued.append(("header" if kind == HEADER else "data", kind, k))
        if kind == HEADER:
            self._launch_headers(k, works)
        else:
            self._launch_data(k, works)

    def _launch_headers(self, k: int, works: list[_Work]) -> None:
        if not works:
            return
        cuda, stream = self._cuda, self.header_stream
        sends = [w for w in works if w.send]
        recvs = [w for w in works if not w.send]
        o_out = offsets(_nbytes(w.buf) for w in sends)
        o_in = offsets(_nbytes(w.buf) for w in recvs)
        out_bytes, in_bytes = o_out[-1], o_in[-1]
        host_out, host_in = cuda.pinned(out_bytes), cuda.pinned(in_bytes)
        with cuda.use(stream):
            dev_out = cuda.empty((out_bytes,), torch.uint8)
            dev_in = cuda.empty((in_bytes,), torch.uint8)
        plan_s, plan_r = [], []
        # Headers are host tensors: they travel through pinned memory and a device buffer.
        for w, (a, b) in zip(sends, pairwise(o_out), strict=True):
            host_out[a:b].copy_(w.buf.reshape(-1).view(torch.uint8))
            plan_s.append((w.peer, dev_out[a:b]))
        for w, (a, b) in zip(recvs, pairwise(o_in), strict=True):
            plan_r.append((w.peer, dev_in[a:b]))
            w.staged = host_in[a:b]
        if out_bytes:
            cuda.copy_async(dev_out, host_out, stream)
        start = cuda.record(stream)
        self._group(self.header_comm, stream, plan_s, plan_r)
        if in_bytes:
            cuda.copy_async(host_in, dev_in, stream)
        ev = cuda.record(stream)
        self.watchdog.watch(start, ev, "header", k)
        for w in works:
            w.event, w.keep = ev, (dev_out, dev_in, host_out)

    def _launch_data(self, k: int, works: list[_Work]) -> None:
        cuda, stream = self._cuda, self.data_stream
        ready = self._slot_ready.pop(k, None)
        if ready is not None:
            cuda.wait_event(stream, ready)
        sends = [(w.peer, w.buf) for w in works if w.send]
        recvs = [(w.peer, w.buf) for w in works if not w.send]
        start = cuda.record(stream) if works else None  # reached once the gate and slot passed
        if works:
            self._group(self.data_comm, stream, sends, recvs)
        for _, buf in sends:
            cuda.record_stream(buf, stream)  # the caller's slot is read on this stream
        ev = cuda.record(stream)
        if start is not None:
            self.watchdog.watch(start, ev, "data", k)
        for w in works:
            w.event = ev

    def _group(self, comm: Any, stream: Any, sends: list, recvs: list) -> None:
        nccl, s = self._nccl, self._cuda.handle(stream)
        with self._lock:  # abort() waits for a call in progress to return
            self._check()
            nccl.groupStart()
            try:
                for peer, buf in sends:
                    comm.send(buf.data_ptr(), _nbytes(buf), nccl.NCCL_UINT8, peer, s)
                for peer, buf in recvs:
                    comm.recv(buf.data_ptr(), _nbytes(buf), nccl.NCCL_UINT8, peer, s)
            finally:
                nccl.groupEnd()

    def wait(self, work: _Work, timeout_s: float) -> None:
        self._check()
        if work.event is None:
            raise RuntimeError(f"iteration {work.k}: an NCCL message was waited before flush()")
        if not self._host_wait(work.event, timeout_s):
            raise self._timed_out("header" if work.kind == HEADER else "data", work.k, timeout_s)
        self._check()  # aborted meanwhile: what arrived is not to be trusted
        if work.staged is not None:
            work.buf.reshape(-1).view(torch.uint8).copy_(work.staged)
            work.staged = None
        work.keep = None

    def _host_wait(self, event: Any, timeout_s: float) -> bool:
        """host_wait in slices, raising the channel's error as soon as there is one (the watchdog
        or another thread failed the channel)."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            left = deadline - time.monotonic()
            if self._cuda.host_wait(event, min(max(left, 0.0), 0.05)):
                return True
            self._check()
            if left <= 0:
                return False

    def order(self, work: _Work, timeout_s: float) -> None:
        if work.kind == HEADER:
            self.wait(work, timeout_s)
            return
        self._check()
        if work.event is None:
            raise RuntimeError(f"iteration {work.k}: an NCCL message was ordered before flush()")
        cuda = self._cuda
        stream = cuda.current_stream()
        last = self._last_order
        # Every work of a group shares one event: wait on it once. The tuple holds the event, so
        # the identity test cannot match a new event that reused a freed one's address.
        if last is None or last[0] != cuda.handle(stream) or last[1] is not work.event:
            cuda.wait_event(stream, work.event)
            self._last_order = (cuda.handle(stream), work.event)
        if not work.send:
            cuda.record_stream(work.buf, stream)  # the caller reads it there
        self._check()  # failed meanwhile (the watchdog): say so now rather than at the next call

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the watchdog and failures -------------------------------------------------------------

    def _late(self, comm: str, k: int) -> None:
        """The watchdog saw a group of iteration k late: fail the channel (the engine raises the
        error at its next call)."""
        if self._error is None:
            try:
                self._timed_out(comm, k, self._timeout_s)
            except Exception:
                pass  # the channel's error is set: the engine raises it at its next call

    def _timed_out(self, what: str, k: int, timeout_s: float) -> PeerFailure:
        """The channel's failure for a group of iteration k that did not complete in time: the
        silent peers named through the store, the communicators aborted."""
        with self._fail_lock:
            if self._error is not None:
                return self._error  # type: ignore[return-value]
            grace = blame_grace(self._timeout_s)
            silent, sure = self._blame_store(k, grace)
            peer = silent[0] if sure and silent else None
            counts = ""
            if self._counters is not None and hasattr(self._counters, "device_counts"):
                counts = f"; device counts {self._counters.device_counts()}"
            who = (
                f"rank(s) {silent} did not report it"
                if sure and silent
                else "the failing peer could not be told apart"
            )
            err = PeerFailure(
                f"timed out after {timeout_s:.1f} s: the NCCL {what} group of iteration {k} did "
                f"not complete ({who}; a peer is silent or dead; the communicators were aborted; "
                f"last groups issued {list(self.issued)[-4:]}{counts})",
                peer,
                reason=PeerFailure.TIMED_OUT,
            )
            self._abort(err)
            return err

    def _blame_store(self, k: int, grace_s: float) -> tuple[list[int], bool]:
        """The peers that did not report a failure of this channel within `grace_s`, as the gloo
        transport finds them."""
        return blame_through_store(
            self._store, self.rank, self.world_size, k, grace_s, self._shared, self._timeout_s
        )

    def blame(self, k: int, exc: BaseException, grace_s: float) -> tuple[list[int], bool]:
        peer = getattr(exc, "peer", None)
        if peer is not None:
            return [peer], True
        return self._blame_store(k, grace_s)

    def test(self, work: _Work) -> bool:
        """Whether a work's group completed, without blocking (False until it was launched)."""
        return work.event is not None and self._cuda.host_wait(work.event, 0.0)

    def abort(self) -> None:
        self._abort(PeerFailure("the channel was abandoned", -1, reason=PeerFailure.ABORTED))

    def _abort(self, err: BaseException) -> None:
        """Fail the channel and abort both communicators, from any thread.

        The error is set first, so that every wait and every later call raises it. The NCCL calls
        of the issuing thread are made under self._lock: abort waits (up to a grace) for one in
        progress to return, so it never frees a communicator under a running call; a call stuck
        in NCCL past the grace is what ncclCommAbort exists to end, and it goes ahead.
        """
        if self._error is None:
            self._error = err
        self.watchdog.stop()
        got = self._lock.acquire(timeout=_ABORT_GRACE_S)
        try:
            if self._aborted:
                return
            self._aborted = True
            for comm in (self.header_comm, self.data_comm):
                try:
                    comm.abort()
                except Exception:
                    pass
        finally:
            if got:
                self._lock.release()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.watchdog.stop(join_s=1.0)
        if self._error is not None:
            return  # aborted already
        for stream in (self.header_stream, self.data_stream):
            if not self._cuda.host_wait(self._cuda.record(stream), 30.0):
                self._abort(TimeoutError("NCCL streams still busy at close"))
                return
        with self._lock:
            for comm in (self.header_comm, self.data_comm):
                comm.destroy()
