"""The BLS engine: a bounded-lag alltoallv channel over a transport (docs/design.md, "The contract").

Iteration k on a rank costs at most two alltoalls of the transport, never a message per peer:

  exchange(k)  checks its arguments, copies `send` into slot k % (B+1) of the send ring (on a host
               transport, a large payload goes from `send` straight into the message instead),
               and posts the MESSAGE alltoall of k: one
               fixed-size header per peer (split, dtype, trailing dims, the receiver's expected
               split, the sender's release count) and, where the transport allows it, the payload
               behind it when it fits the channel's inline capacity. It never waits for peers.
  process(k)   once the messages of k arrived: checks every header (a mismatch is caught on both
               sides of a pair before a byte lands in a buffer of the wrong size), then either
               gathers the inline payloads into the receive tensor, or, when any rank sent a
               payload too large to inline (every rank sees every sender's flag, so all agree),
               posts the DATA alltoall of k with exactly sized receives straight into it.
               Done by a progress thread (the CPU analogue of the GPU comm stream) for iterations
               posted ahead, or by the caller itself when it waits on one nobody took yet.
  wait(k)      completes k (the data alltoall, if any), releases it, returns the tensor.

A rank posts iteration k only after it released k-B-1; asking for more raises at once. Each kind's
alltoalls complete in posting order on every rank, so no rank finishes k before every peer released
k-B-1. On a stream-ordered transport (one whose data completes on device streams) the data alltoall
runs on the comm stream after the counters' device gate (released >= k-B), and wait(k) makes the
caller's current stream wait for it instead of the host.

The engine knows transports only through blsgpu.transport.Transport: what device they use and how
their work completes is theirs to say. The code is split by job: args.py (argument checks),
message.py (the header layout and host buffers), iteration.py (an iteration's record and handle),
posting.py (exchange), progress.py (processing and wait), this module (the channel: its state,
public API, handles, failures and shutdown).
"""

from __future__ import annotations

import math
import queue
import threading
from datetime import timedelta
from typing import Any

import torch

from blsgpu import _env
from blsgpu._trace import span
from blsgpu.errors import PeerError, PeerFailure
from blsgpu.exchange.args import check_options
from blsgpu.exchange.iteration import Iteration
from blsgpu.exchange.message import DTYPE_CODE, HEADER_BYTES, Buffer, Rows, native
from blsgpu.exchange.posting import Posting
from blsgpu.exchange.progress import Progress
from blsgpu.transport import Transport, make_transport
from blsgpu.transport.base import blame_grace

# Per-peer payloads up to this many bytes ride behind the header (one alltoall per iteration) on
# transports that allow a receive longer than what arrives. Up to about 1 MiB the two host copies
# this costs are cheaper than the data alltoall's extra round trip (TorchRec's KJT values, ~320 KiB
# per peer in perf/bench_torchrec.py, spilled at the former 256 KiB: 0.65x of gloo, now ~0.9x).
DEFAULT_INLINE_BYTES = 1 << 20
_INLINE_BUDGET = 32 << 20  # per channel and slot, over all peers


class ExchangeHandle:
    """One posted iteration of a channel. `wait()` returns (recv, recv_splits); `done()` polls."""

    __slots__ = ("_channel", "_it")

    def __init__(self, channel: BoundedLagAllToAll, it: Iteration):
        self._channel = channel
        self._it = it

    @property
    def iteration(self) -> int:
        return self._it.k

    def done(self) -> bool:
        """True once wait() will not block the host for the headers (on a host transport: nor for
        the data). Polling hands the iteration to the progress thread if nobody has it yet."""
        return self._channel._poll(self._it)

    def wait(self, blocking: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Block until iteration k arrived, release it, return (recv, recv_splits).

        Earlier iterations of the channel that were not waited yet are completed first (their
        handles keep their results), so releases stay in order. On a stream-ordered transport the
        host waits for the headers only and the caller's current stream waits for the data;
        blocking=True makes the host wait for the data too.
        """
        return self._channel._wait(self._it, blocking)

    def __repr__(self) -> str:
        return f"ExchangeHandle(channel={self._channel.name!r}, iteration={self._it.k})"


class BoundedLagAllToAll(Posting, Progress):
    """A bounded-lag alltoallv channel over a torch.distributed group.

    Args:
        group: the process group (None: the default group). Creating a channel is collective:
            every rank of the group creates its channels in the same order.
        bound: B, how many iterations this rank may run ahead of its slowest peer.
        device: where received tensors are returned (default: the device of each send tensor).
        transport: "gloo" (CPU), "nccl" (GPU, CuPy), "local" (the ranks of blsgpu.transport.local.run_local)
            or "auto": local inside run_local, else nccl for a CUDA device when the GPU path is
            available, else gloo. A transport object is used as it is (benchmarks, tests).
        timeout: how long a wait may last before a silent peer is declared failed.
        name: the channel's name in errors, stats and traces.
        inline_bytes: per-peer payloads up to this size travel behind the header, in the same
            alltoall (gloo only; default min(1 MiB, 32 MiB / W)); the ranks agree on the smallest
            value asked. 0 turns it off. Untouched receive pages cost no memory.
        known_splits: every exchange() on every rank passes recv_splits. On a stream-ordered
            transport (NCCL, the in-process mode) no header travels then: the data moves sized by
            the splits, one NCCL group per iteration, with no header round trip before it; the
            splits are trusted (a wrong one is NCCL's size mismatch, not a ValueError) and stats'
            lag counts only this rank's iterations not yet launched (peers report nothing). The
            ranks agree at creation: unless every rank asks for it, headers travel as usual.
            Ignored on gloo, where small payloads ride in the headers.
    """

    def __init__(
        self,
        group: Any = None,
        bound: int = 4,
        device: torch.device | str | None = None,
        transport: str = "auto",
        timeout: timedelta | float | None = None,
        name: str | None = None,
        inline_bytes: int | None = None,
        known_splits: bool = False,
    ):
        self.timeout_s = check_options(bound, timeout, inline_bytes)
        self.bound = bound
        self.device = torch.device(device) if device is not None else None
        try:
            self.transport: Transport = make_transport(transport, group, self.device, self.timeout_s)
            tr = self.transport
            tr.connect(self.timeout_s)  # every pair connects now, within the timeout (or at first use)
        except PeerFailure as e:
            raise PeerError(
                f"BLS channel {name or 'new'!r}: peer {e.peer} failed during channel creation: {e}",
                peer=e.peer,
                channel=name or "new",
                iteration=-1,
            ) from e
        self.rank = tr.rank
        self.world_size = tr.world_size
        self.name = name or f"bls{tr.channel_id}"
        self._counters = tr.make_counters(self.world_size, self.rank, self.timeout_s)
        self._inline = self._agree_inline_bytes(inline_bytes)
        # Header-less iterations: stream-ordered transports only, and only if every rank asked.
        self._known = False
        if tr.stream_ordered and self.world_size > 1:
            self._known = bool(tr.agree_min(int(bool(known_splits))))
        # MESSAGE alltoall: a header (and room for an inline payload) from every peer, nothing
        # from itself (a rank's own rows never travel; its header is known). Regions are all alike,
        # so the received headers are one strided [W-1, 16] view of the buffer.
        W, me, H = self.world_size, self.rank, HEADER_BYTES
        self._stride = H + self._inline
        self._msg_out_sizes = [self._stride] * W
        self._msg_out_sizes[me] = 0
        self._msg_in_bytes = (W - 1) * self._stride
        n = bound + 1
        self._slots = [Buffer() for _ in range(n)]  # send ring, on the transport's device
        self._msg_in = [Buffer() for _ in range(n)]  # host, one size: untouched pages cost nothing
        for b in self._msg_in:
            b.host(self._msg_in_bytes)
        self._msg_in_t = [b.torch(self._msg_in_bytes) for b in self._msg_in]  # what the alltoalls fill
        self._msg_out = [Buffer() for _ in range(n)]  # host
        self._kinds: dict[tuple, Rows] = {}  # (dtype, trailing dims) -> what the engine derives of them
        self._records: dict[int, Iteration] = {}
        self._next_k = 0
        self._next_wait = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._fail_lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._send_device: torch.device | None = None  # of the latest send tensor
        self._warned_staging = False
        self._blocked_on_bound_s = 0.0
        self._waiting_for_data_s = 0.0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._fast_posts = 0
        # B=0 callers wait on each iteration right after posting it: they process it themselves
        # (no thread hand-off). Iterations posted ahead go to the progress thread at once.
        self._eager = bound > 0 or not tr.caller_may_receive
        # Host transports gather inline payloads on the caller's thread (what the progress thread
        # must do early is only to post data alltoalls, which peers wait for).
        self._gather_late = not tr.stream_ordered
        # Until some rank needed a data alltoall, iterations wait for the caller: their messages
        # complete in the transport's own threads, and a progress thread would only look at them.
        # From the first one on (or when this rank spills), iterations go to it when posted.
        self._spilled = False
        # Host transports whose caller may receive post inline payloads straight from the caller's
        # tensor into the message: no send slot unless some rank spills.
        self._direct = not tr.stream_ordered and tr.caller_may_receive and tr.device.type == "cpu"
        # The byte work on host buffers (headers, inline payloads, gather): C where it was built.
        self._native = native()
        # The common case of such a transport (contiguous host tensors, splits as lists, inline
        # payloads) in two C calls each for exchange() and wait(): Posting._post_fast.
        self._fast = (
            _env.fast_enabled()
            and self._direct
            and self._native is not None
            and self._inline > 0
            and (self.device is None or self.device.type == "cpu")
        )
        # Where the caller's thread may not process an iteration itself, or the progress thread
        # posts every alltoall, every iteration goes to the progress thread when posted.
        self._handoff_always = not tr.caller_may_receive or not self._gather_late
        # Stream-ordered transports: one thread, the progress thread, posts every
        # alltoall of the channel (MESSAGE of k, then DATA of k, then MESSAGE of k+1, ...), so every
        # rank issues to its communicators in one global order and no caller thread ever waits on
        # the host for headers (docs/design.md, "The GPU path").
        self._ordered = tr.stream_ordered
        if self._ordered and tr.caller_may_receive:
            raise ValueError(
                f"transport {tr.name!r}: a stream-ordered transport is driven by the "
                f"progress thread alone (caller_may_receive must be False)"
            )
        self._queue: queue.SimpleQueue[Iteration | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._progress_ordered if self._ordered else self._progress,
            name=f"blsgpu-{self.name}-r{self.rank}",
            daemon=True,
        )
        self._thread.start()

    # ----------------------------------------------------------------------------------------
    # public API

    def __enter__(self) -> BoundedLagAllToAll:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Do not mask the caller's error with a drain that may wait on the same broken peer.
            self._shutdown(abandon=True)

    def send_buffer(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in the send ring that the next `exchange()` posts without a copy.

        Fill it (e.g. with `blsgpu.pooled_lookup(..., out=buf)`) and pass it as `send`. Like
        exchange(), it raises BoundError when B+1 exchanges are outstanding.
        """
        self._check_usable()
        if dtype not in DTYPE_CODE:
            raise TypeError(f"dtype {dtype} is not supported by the exchange")
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 0 for s in shape):
            raise ValueError(f"send_buffer shape must be non-empty and non-negative, got {shape}")
        self._check_bound(self._next_k)
        nbytes = math.prod(shape) * dtype.itemsize
        return self._slot(self._next_k, nbytes).typed(dtype, shape)

    def exchange(
        self, send: torch.Tensor, send_splits: Any, recv_splits: Any = None, out: torch.Tensor | None = None
    ) -> ExchangeHandle:
        """Post the next iteration: rows send[sum(send_splits[:p]) : ...] go to rank p.

        Non-blocking: it returns once the messages are posted, and `send` may be reused at once.
        With `out` (and recv_splits, which size it), the received rows land in `out` and wait()
        returns it: a contiguous host `out` is written in place, any other is copied into.
        Raises before anything is sent when the arguments are wrong, when the channel is closed,
        or when B+1 exchanges are already outstanding.
        """
        it = self._post_fast(send, send_splits, recv_splits, out) if self._fast else None
        if it is None:
            with span("post", self.name, self._next_k):
                it = self._post(send, send_splits, recv_splits, out)
        return ExchangeHandle(self, it)

    def stats(self) -> dict[str, Any]:
        """Counters and times of this channel (docs/design.md, "Observable")."""
        c = self._counters
        return c.extra_stats() | {
            "channel": self.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "bound": self.bound,
            "transport": self.transport.name,
            "native": self._native is not None,
            "fast_path": self._fast,
            "fast_iterations": self._fast_posts,
            **c.snapshot(),
            "blocked_on_bound_s": self._blocked_on_bound_s,
            "waiting_for_data_s": self._waiting_for_data_s,
            "bytes_sent": self._bytes_sent,
            "bytes_received": self._bytes_received,
        }

    def close(self) -> None:
        """Wait out every outstanding iteration (so every posted message was delivered), then stop.

        Returns only once all this rank posted has reached its peers (or raises PeerError after the
        timeout), so a rank that finishes first never cuts a slower peer off.
        """
        if self._closed:
            return
        clean = False
        try:
            if self._broken is None:
                for k in range(self._next_wait, self._next_k):
                    self._wait(self._records[k], True)
                clean = True
        finally:
            self._shutdown(abandon=not clean)

    # ----------------------------------------------------------------------------------------
    # failures and shutdown

    def _fail(self, k: int, what: str, exc: BaseException) -> BaseException:
        """The channel's first failure as a PeerError naming the peer (asking the transport when
        the error does not say); later failures raise the same error again."""
        with self._fail_lock:
            if self._broken is not None:
                return self._broken
            grace = blame_grace(self.timeout_s)
            peers, sure = self.transport.blame(k, exc, grace)
            others = [p for p in range(self.world_size) if p != self.rank]
            peer = peers[0] if peers else (others[0] if others else self.rank)
            note = ""
            if sure and len(peers) > 1:
                note = f" (ranks {peers} did not report the failure either)"
            elif not sure and not peers:
                note = " (the failing peer could not be told apart)"
            # The transport says what happened where it knows; else its message's first line does.
            text = str(exc)
            cause = getattr(exc, "reason", None) or (text.splitlines()[0] if text else type(exc).__name__)
            err = PeerError(
                f"BLS channel {self.name!r} (rank {self.rank}): peer {peer} failed during iteration "
                f"{k} ({what}): {cause}{note}",
                peer=peer,
                channel=self.name,
                iteration=k,
            )
            self._broken = err
            return err

    def _shutdown(self, abandon: bool) -> None:
        if self._closed:
            return
        self._closed = True
        pending = abandon and any(
            not it.finished or it.data_work is not None for it in self._records.values()
        )
        self._queue.put(None)
        if pending:
            # Cancel what is still posted on this channel's own connections: nothing else shares
            # them, and the caller does not wait for a peer that may never come.
            self.transport.abort()
        elif threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)
        self._records.clear()
        if not pending:
            self.transport.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"channel {self.name!r} is closed")
        if self._broken is not None:
            # The first failure says it all (peer, channel, iteration): raise it again.
            raise self._broken

    def _agree_inline_bytes(self, asked: int | None) -> int:
        if not self.transport.inline_ok:
            return 0
        if asked is None:
            asked = min(DEFAULT_INLINE_BYTES, _INLINE_BUDGET // max(self.world_size, 1))
        asked -= asked % 8  # keeps every header in the ring 8-byte aligned
        # A receive region must never be shorter than what arrives: all ranks use the smallest.
        return self.transport.agree_min(asked)
