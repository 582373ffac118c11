"""The single-process multi-rank mode: W ranks as W threads of one process, running the same engine.

``run_local(W, fn, *args, device=...)`` runs fn(rank, W, *args) on W threads, the way run_world runs it
on W processes. Inside fn, a channel built with group=None and transport "auto" gets an in-process
transport over a fabric shared by the W ranks, so tests and benchmarks drive the real engine
(progress threads, headers, bound, counters, errors) at W ranks with no processes and no network:

- CPU: messages are copies between the ranks' host tensors; fully testable in CI.
- GPU: each rank is a "stream set" on one device. The rank's thread runs on its own compute stream,
  each channel owns a comm stream, data moves by device-to-device copies on the receiver's comm stream
  (after the sender's comm stream passed its device gate for that iteration, as an NCCL group would
  wait for both sides), and the lag counters are the device counters, so stream gates and releases
  run exactly as they do with NCCL. ``gpu_sleep`` injects delays on the GPU.

Iteration k between ranks s -> d: the header travels as soon as s's progress thread posts it
(headers are tiny host tensors); data waits for flush(DATA, k), where s publishes its send buffers
(with, on a GPU, an event after its gate) and d, having published its own, takes each peer's and
copies it into its receive buffer. A send is delivered once the receiver copied it (on a GPU: once
the receiver's copy event completed). As with NCCL, the stream-ordered modes (a GPU, or
emulate_streams) have the engine's progress thread post every message of a channel, in one order on
every rank, and the gate is an event after the consumer's release (blsgpu/counters/device.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blsgpu.counters.host import HostCounters
from blsgpu.errors import LinkError, RankError
from blsgpu.transport.base import DATA, HEADER, PointToPoint


class _Fabric:
    """What the W ranks of one local world share: mailboxes, delivery marks, who left."""

    def __init__(self, world_size: int, device: torch.device, loopback: bool, emulate: bool):
        self.world_size = world_size
        self.device = device
        self.loopback = loopback
        self.emulate = emulate  # CPU: run the engine's stream-ordered path (tests)
        self.cond = threading.Condition()
        self.mail: dict[tuple, Any] = {}  # (channel, kind, k, src, dst) -> message
        self.delivered: dict[tuple, Any] = {}  # (channel, k, src, dst) -> True or the copy's event
        self.left: dict[int, str] = {}  # rank -> why it left (an exception)
        self.order: list[int] = []  # ranks in the order they failed

    def fail(self, rank: int, why: str) -> None:
        with self.cond:
            if rank not in self.left:
                self.left[rank] = why
                self.order.append(rank)
            self.cond.notify_all()

    def leave(self, rank: int, why: str) -> None:
        """A rank finished: like a process that exited, a peer still waiting for it fails at once."""
        with self.cond:
            self.left.setdefault(rank, why)
            self.cond.notify_all()

    def put(self, key: tuple, value: Any) -> None:
        with self.cond:
            self.mail[key] = value
            self.cond.notify_all()

    def _await(self, table: dict, key: tuple, peer: int, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while key not in table:
                if peer in self.left:
                    raise LinkError(
                        f"connection closed: rank {peer} left the local world ({self.left[peer]})",
                        peer,
                        LinkError.CLOSED,
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LinkError(
                        f"timed out after {timeout_s:.1f} s waiting for {what}", peer, LinkError.TIMED_OUT
                    )
                self.cond.wait(left)
            return table.pop(key)

    def take(self, key: tuple, peer: int, timeout_s: float) -> Any:
        return self._await(self.mail, key, peer, timeout_s, f"a message from rank {peer}")

    def mark_delivered(self, key: tuple, value: Any) -> None:
        with self.cond:
            self.delivered[key] = value
            self.cond.notify_all()

    def await_delivery(self, key: tuple, peer: int, timeout_s: float) -> Any:
        return self._await(self.delivered, key, peer, timeout_s, f"rank {peer} to receive")


class LocalGroup:
    """One rank's view of a local world: what a process group is to run_world."""

    def __init__(self, fabric: _Fabric, rank: int):
        self.fabric = fabric
        self._rank = rank
        self._channels = 0

    def next_channel_id(self) -> int:
        # Channels are created in the same order on every rank. Counted here, not by id(group) as
        # process groups are: a new world's groups may reuse the addresses of a finished one's.
        self._channels += 1
        return self._channels - 1

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self.fabric.world_size

    def __repr__(self) -> str:
        return f"LocalGroup(rank={self._rank}, world_size={self.fabric.world_size})"


_tls = threading.local()


def current_group() -> LocalGroup | None:
    """The local group of the calling rank thread of run_local, else None."""
    return getattr(_tls, "group", None)


def resolve_group(group: Any) -> LocalGroup | None:
    """`group` if it is a LocalGroup; for None, the calling rank thread's group (if any)."""
    if isinstance(group, LocalGroup):
        return group
    if group is None:
        return current_group()
    return None


@dataclass(eq=False)
class _Work:
    kind: int
    k: int
    peer: int
    buf: torch.Tensor
    send: bool
    event: Any = None  # GPU: the copy's event once launched
    launched: bool = False


class LocalTransport(PointToPoint):
    """The in-process transport of one channel of one rank (see the module docstring)."""

    name = "local"

    def __init__(self, group: LocalGroup):
        self.group = group
        self.fabric = group.fabric
        self.rank = group.rank()
        self.world_size = group.size()
        self.channel_id = group.next_channel_id()
        self.device = self.fabric.device
        self.loopback = self.fabric.loopback
        gpu = self.device.type == "cuda"
        self.stream_ordered = gpu or self.fabric.emulate
        self.caller_may_receive = False  # receives stay on the progress thread
        self.stream = _own_stream(self.device) if gpu else None
        self._sends: dict[int, list[_Work]] = {}
        self._recvs: dict[int, list[_Work]] = {}
        self._slot_ready: dict[int, Any] = {}  # k -> event on the caller's stream after the slot
        self._last_order: tuple[int, Any] | None = None  # (stream, event): holds the event
        self._timeout_s = 300.0
        self._agreements = 0

    def make_counters(self, world_size: int, rank: int, timeout_s: float) -> HostCounters:
        self._timeout_s = timeout_s
        if not self.stream_ordered:
            return HostCounters(world_size, rank)
        from blsgpu.counters import device as dc  # GPU, or its CPU emulation

        ops = dc.HostOps() if self.stream is None else None
        return dc.DeviceCounters(world_size, rank, self.device, self.stream, timeout_s, ops=ops)

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks (collective, at channel creation)."""
        n = self._agreements
        self._agreements += 1
        ch, me = self.channel_id, self.rank
        for p in range(self.world_size):
            if p != me:
                self.fabric.put((ch, "agree", n, me, p), int(value))
        got = [
            self.fabric.take((ch, "agree", n, p, me), p, self._timeout_s)
            for p in range(self.world_size)
            if p != me
        ]
        return min([int(value), *got])

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.stream is None:
            return torch.empty(shape, dtype=dtype)
        with torch.cuda.stream(self.stream):  # written by this comm stream: allocate on it
            return torch.empty(shape, dtype=dtype, device=self.device)

    def isend(self, buf: torch.Tensor, peer: int, kind: int, k: int) -> _Work:
        self._check_peer(peer)
        if kind == HEADER:
            self.fabric.put((self.channel_id, HEADER, k, self.rank, peer), buf.clone())
            return _Work(HEADER, k, peer, buf, True, launched=True)
        work = _Work(DATA, k, peer, buf, True)
        self._sends.setdefault(k, []).append(work)
        return work

    def irecv(self, buf: torch.Tensor, peer: int, kind: int, k: int) -> _Work:
        self._check_peer(peer)
        work = _Work(kind, k, peer, buf, False)
        if kind == DATA:
            self._recvs.setdefault(k, []).append(work)
        return work

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world_size or (peer == self.rank and not self.loopback):
            raise ValueError(f"rank {self.rank} cannot message rank {peer}")

    def slot_written(self, k: int) -> None:
        """exchange(k) filled its send slot on the caller's current stream: mark where."""
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._slot_ready[k] = ev

    def flush(self, kind: int, k: int) -> None:
        if kind == DATA:
            self._launch_data(k)

    def _launch_data(self, k: int) -> None:
        sends = self._sends.pop(k, [])
        recvs = self._recvs.pop(k, [])
        ch, me, gpu = self.channel_id, self.rank, self.stream is not None
        gate = None
        if gpu:
            ready = self._slot_ready.pop(k, None)
            if ready is not None:
                self.stream.wait_event(ready)
            gate = torch.cuda.Event()
            gate.record(self.stream)  # after this rank's device gate for k and its slot
        for w in sends:
            self.fabric.put((ch, DATA, k, me, w.peer), (w.buf, gate))
            w.launched = True
        deadline = time.monotonic() + self._timeout_s
        taken = []
        for w in recvs:
            src, src_gate = self.fabric.take((ch, DATA, k, w.peer, me), w.peer, deadline - time.monotonic())
            if src.numel() != w.buf.numel():
                raise LinkError(
                    f"rank {w.peer} sent {src.numel()} bytes for iteration {k} but rank {me} "
                    f"receives {w.buf.numel()}",
                    w.peer,
                )
            if gpu:
                self.stream.wait_event(src_gate)
                with torch.cuda.stream(self.stream):
                    w.buf.copy_(src, non_blocking=True)
                src.record_stream(self.stream)  # the sender's slot is read on this stream
            else:
                w.buf.copy_(src)
            taken.append(w)
        done = None
        if gpu:
            done = torch.cuda.Event()
            done.record(self.stream)
        for w in taken:
            w.event, w.launched = done, True
            self.fabric.mark_delivered((ch, k, w.peer, me), done if gpu else True)

    def wait(self, work: _Work, timeout_s: float) -> None:
        if work.kind == HEADER:
            if not work.send:
                key = (self.channel_id, HEADER, work.k, work.peer, self.rank)
                work.buf.copy_(self.fabric.take(key, work.peer, timeout_s))
            return
        event = self._data_event(work, timeout_s)
        if event is not None:
            from blsgpu.counters.device import host_wait  # GPU only

            if not host_wait(event, timeout_s):
                raise LinkError(
                    f"timed out after {timeout_s:.1f} s on the copy of iteration "
                    f"{work.k} with rank {work.peer}",
                    work.peer,
                    LinkError.TIMED_OUT,
                )

    def test(self, work: _Work) -> bool:
        """Whether wait(work) would return at once."""
        if work.kind == HEADER:
            return work.send or (self.channel_id, HEADER, work.k, work.peer, self.rank) in self.fabric.mail
        if work.send:
            done = work.event
            if done is None:  # the receiver marks it delivered once it copied it (a GPU: its event)
                done = self.fabric.delivered.get((self.channel_id, work.k, self.rank, work.peer))
        elif work.launched:
            done = work.event or True  # copied at flush (on a GPU: once its event completes)
        else:
            return False
        return done is True or (done is not None and done.query())

    def order(self, work: _Work, timeout_s: float) -> None:
        if self.stream is None or work.kind == HEADER:
            self.wait(work, timeout_s)
            return
        event = self._data_event(work, timeout_s)
        stream = torch.cuda.current_stream(self.device)
        last = self._last_order  # holds the event, so identity cannot match a reused address
        if last is None or last[0] != stream.cuda_stream or last[1] is not event:
            stream.wait_event(event)
            self._last_order = (stream.cuda_stream, event)
        if not work.send:
            work.buf.record_stream(stream)  # the caller reads it there: keep the allocator off

    def _data_event(self, work: _Work, timeout_s: float) -> Any:
        """Block until the data work was launched; its completion event (None on CPU)."""
        if work.send:
            if work.event is None:
                key = (self.channel_id, work.k, self.rank, work.peer)
                work.event = self.fabric.await_delivery(key, work.peer, timeout_s)
                work.launched = True
            return None if work.event is True else work.event
        if not work.launched:
            raise RuntimeError(f"iteration {work.k}: a data receive was waited before flush()")
        return work.event

    def close(self) -> None:
        pass


def _own_stream(device: torch.device) -> Any:
    from blsgpu.counters.device import own_stream  # GPU only

    return own_stream(device)


def run_local(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    device: torch.device | str = "cpu",
    loopback: bool | None = None,
    timeout_s: float = 300.0,
    return_exceptions: bool = False,
    emulate_streams: bool = False,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on world_size threads of this process; return each result.

    Channels built inside fn with group=None (transport "auto") are in-process channels of this world.
    On a CUDA device each rank thread runs on a stream of its own and the streams are synchronized
    before fn's result counts. A rank that raises makes every peer waiting on it fail at once, and
    run_local raise RankError naming the first rank that failed (or, with return_exceptions=True,
    return exceptions in the ranks' places).

    Args:
        loopback: a rank messages itself through the fabric (default on a GPU, where it must);
            False copies the self part in the engine, as gloo does.
        emulate_streams: CPU only: drive the engine's stream-ordered path (hand-over through
            order(), device counters over host-emulated stream operations), as a GPU runs it.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if emulate_streams and device.type != "cpu":
        raise ValueError("emulate_streams is for CPU runs; a GPU runs the real streams")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run_local(device='cuda') needs a CUDA GPU; none is visible")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if loopback is False:
            raise ValueError("on a GPU the self part must travel on the comm stream: loopback=True")
        loopback = True
    fabric = _Fabric(world_size, device, bool(loopback), emulate_streams)
    results: list[Any] = [None] * world_size
    errors: dict[int, BaseException] = {}

    def main(rank: int) -> None:
        _tls.group = LocalGroup(fabric, rank)
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
                stream = _own_stream(device)
                with torch.cuda.stream(stream):
                    results[rank] = fn(rank, world_size, *args)
                stream.synchronize()
            else:
                results[rank] = fn(rank, world_size, *args)
            # Like a process that exits: a peer still waiting for this rank learns it at once.
            fabric.leave(rank, "it returned")
        except BaseException as e:  # handed to the caller below
            errors[rank] = e
            fabric.fail(rank, f"{type(e).__name__}: {e}")
        finally:
            _tls.group = None

    threads = [
        threading.Thread(target=main, args=(r,), name=f"blsgpu-local-r{r}", daemon=True)
        for r in range(world_size)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for r, t in enumerate(threads):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            for p in range(world_size):
                fabric.fail(p, "run_local timed out")
            raise RankError(f"rank {r} still running after {timeout_s:.0f} s", rank=r)
    if errors and not return_exceptions:
        first = next(r for r in fabric.order if r in errors)
        e = errors[first]
        raise RankError(
            f"rank {first} raised {type(e).__name__}: {e}", rank=first, remote_type=type(e).__name__
        ) from e
    return [errors.get(r, results[r]) for r in range(world_size)]
