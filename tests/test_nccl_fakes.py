"""The NCCL transport's own logic through the real engine, over a fake CUDA and NCCL that run
streams and matching on CPU (tests/_fake_nccl.py): one group per iteration and kind, header
staging, loopback, event hand-over, record_stream, abort on timeout, one issuing thread in one
global order, the device gate, the watchdog. The contract itself runs on this world too
(tests/test_contract.py, "nccl-fakes"); the tests here that run a contract body read what the
fakes saw of it.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch
from _contract import check_exact, known_body, split_matrix
from _fake_nccl import FakeComm, FakeCuda, FakeNccl, Op

import blsgpu
from blsgpu import BoundedLagAllToAll, PeerError
from blsgpu.transport import nccl as _nccl
from blsgpu.transport.local import run_local

nccl_fakes = pytest.mark.parametrize("world", ["nccl-fakes"], indirect=True)


@nccl_fakes
@pytest.mark.parametrize("w,bound", [(1, 2), (3, 0), (3, 2)])
def test_one_group_per_iteration_and_kind_and_record_stream_on_the_right_streams(world, w, bound):
    nccl, built = world.fakes
    iters, seed = 25, 5
    check_exact(world, w, bound, iters=iters, seed=seed)
    for rank in range(w):
        ms = [split_matrix(seed, k, w) for k in range(iters)]
        busy = sum(bool(m[rank].sum() or m[:, rank].sum()) for m in ms)  # data to or from rank
        handed = sum(int((m[:, rank] > 0).sum()) for m in ms)  # receives handed to the caller
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


def _nccl_absent_body(rank, w):
    if rank == 2:
        time.sleep(2.0)  # never creates its channel
        return "absent"
    t0 = time.monotonic()
    try:
        BoundedLagAllToAll(bound=1, timeout=1.0, transport="nccl", name="absent-peer")
    except PeerError as e:
        return e.peer, e.channel, str(e), time.monotonic() - t0
    return "created"


def test_nccl_channel_creation_times_out_when_a_rank_never_connects(fake_nccl):
    nccl, built = fake_nccl
    results = run_local(3, _nccl_absent_body, timeout_s=30)
    assert results[2] == "absent"
    for r in (0, 1):
        peer, channel, msg, elapsed = results[r]
        assert (peer, channel) == (2, "absent-peer") and "channel creation" in msg, msg
        assert "could not connect all 3 ranks within 1.0 s" in msg and 0.8 < elapsed < 3.0
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
        return (e.peer, e.iteration, e.channel, time.monotonic() - t0, a2a.transport.data_comm.aborted)
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
    t = _nccl.NcclTransport.from_parts(
        nccl, cuda, 0, 2, 0, FakeComm(nccl, "0/header", 0, cuda), comm, store=store
    )
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
    work = t.watchdog.watched[0]
    assert work.comm == "header"
    waited = []

    def waiter():
        t0 = time.monotonic()
        try:
            t.wait(_nccl._Work(0, 0, 1, torch.empty(16, dtype=torch.uint8), False, event=work.end), 30.0)
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
    t._timeout_s = t.watchdog.timeout_s = 1.0
    gate_open = threading.Event()
    # The data stream is held by a gate (the consumer has not released yet), then a group that
    # never completes. Behind the gate, the group is not late however long it waits.
    t.data_stream.push(Op(done=gate_open.is_set), ("wait", "gate"))
    t.irecv(cuda.empty((8,), torch.uint8), 1, 1, 0)
    t.flush(1, 0)
    for _ in range(3):
        time.sleep(0.5)
        t.watchdog.look()
    assert t._error is None  # 1.5 s > the timeout, all of it behind the gate
    gate_open.set()
    t.watchdog.look()  # the stream reached the group now: its clock starts
    time.sleep(0.3)
    t.watchdog.look()
    assert t._error is None
    time.sleep(1.0)
    t.watchdog.look()
    assert isinstance(t._error, blsgpu.errors.PeerFailure)
    msg = str(t._error)
    assert "data group of iteration 0" in msg and "could not be told apart" in msg
    assert t._error.peer is None and t.data_comm.aborted


@nccl_fakes
@pytest.mark.parametrize("bound", [0, 2])
def test_known_splits_channel_sends_no_header_on_the_gpu_path(world, bound):
    nccl, built = world.fakes
    w, iters = 3, 20
    results = world.run(w, known_body, bound, iters, 7, [True] * w, timeout_s=60)
    issued = [list(built[rank][0].issued) for rank in range(w)]
    for rank, (bad, known, refused, stats) in enumerate(results):
        assert bad == [] and known
        assert "known_splits=True" in refused
        # One group per iteration, the data's, on every rank alike; no header group at all.
        assert issued[rank] == issued[0]
        assert issued[rank][2:] == [("data", 1, k) for k in range(iters)]
        assert nccl.groups[("0/header", rank)] == 1  # connecting
        assert 0 <= stats["max_lag"] <= bound + 1


@nccl_fakes
def test_known_splits_needs_every_rank_else_headers_travel(world):
    nccl, built = world.fakes
    w, iters = 3, 6
    results = world.run(w, known_body, 1, iters, 7, [True, False, True], timeout_s=60)
    for rank, (bad, known, refused, _) in enumerate(results):
        assert bad == [] and not known and refused is None
        assert ("header", 0, iters - 1) in list(built[rank][0].issued)
        assert nccl.groups[("0/header", rank)] == iters + 1
