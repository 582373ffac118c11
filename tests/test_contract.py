"""The BLS exchange contract (docs/design.md), once per transport through the `world` fixture.

exact: every row delivered bit-identical, variable splits with zeros and empty sends;
bounded: no rank more than B iterations ahead of the slowest peer, BoundError past B+1 outstanding;
live: progress whenever every rank keeps calling (polling alone included);
loud: a dead or a silent peer named in a PeerError on every survivor within the timeout;
observable: stats() counts what happened.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _contract import assert_bounded, bounded_body, channel, check_exact, die, known_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blsgpu import PeerError
from blsgpu.errors import BoundError

# ------------------------------------------------------------------------------------------------
# exact


@pytest.mark.parametrize(
    "w,bound", [(1, 2), (2, 0), (2, 1), (2, 4), (3, 0), (3, 1), (3, 2), (3, 4), (4, 0), (4, 1), (4, 4)]
)
def test_exact_against_a_synchronous_alltoall(world, w, bound):
    check_exact(world, w, bound, iters=200, seed=17 + w * 10 + bound)


def _property_body(rank, w, bound, matrices, trailing):
    out = []
    with channel(bound=bound, timeout=30) as a2a:
        handles = []
        for k, m in enumerate(matrices):
            m = np.asarray(m)
            n = int(m[rank].sum())
            send = (
                torch.arange(n * int(np.prod(trailing)), dtype=torch.int64) + 10**6 * rank + 10**9 * k
            ).view(n, *trailing)
            handles.append(a2a.exchange(send.to(a2a.device), m[rank].tolist()))
            if len(handles) == bound + 1:
                out.append(handles.pop(0).wait())
        out.extend(h.wait() for h in handles)
    return [(r.tolist(), s) for r, s in out]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(w=st.integers(2, 3), bound=st.integers(0, 3), data=st.data())
def test_random_splits(world, w, bound, data):
    iters = data.draw(st.integers(1, 8))
    cell = st.integers(0, 4)
    matrices = [
        data.draw(st.lists(st.lists(cell, min_size=w, max_size=w), min_size=w, max_size=w))
        for _ in range(iters)
    ]
    trailing = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    results = world.run(w, _property_body, bound, matrices, trailing, timeout_s=60)
    width = int(np.prod(trailing))
    for rank, per_iter in enumerate(results):
        for k, (recv, splits) in enumerate(per_iter):
            m = np.asarray(matrices[k])
            assert splits == m[:, rank].tolist()
            expected = []
            for src in range(w):
                base = 10**6 * src + 10**9 * k
                lo = int(m[src, :rank].sum()) * width
                hi = lo + int(m[src, rank]) * width
                expected.extend(base + i for i in range(lo, hi))
            got = torch.tensor(recv, dtype=torch.int64).reshape(-1).tolist()
            assert got == expected


def _edge_shapes_body(rank, w):
    """[n, 0] rows (no bytes) and a recv_splits entry far too large, on one channel."""
    out = []
    with channel(bound=1, timeout=2.0) as a2a:
        for known in (None, [2] * w):
            recv, splits = a2a.exchange(torch.empty(2 * w, 0, device=a2a.device), [2] * w, known).wait()
            out.append((tuple(recv.shape), splits))
        # A wrong recv_splits must not size a buffer: ValueError on both sides, channel intact.
        huge = [2**40] * w
        huge[rank] = 1
        try:
            a2a.exchange(torch.ones(w, 4, device=a2a.device), [1] * w, huge).wait()
            out.append("no error")
        except ValueError as e:
            out.append("recv_splits" in str(e) or str(e))
        recv, _ = a2a.exchange(torch.full((w, 4), float(rank), device=a2a.device), [1] * w).wait()
        out.append(recv[:, 0].tolist())
    return out


def test_zero_width_rows_and_absurd_recv_splits(world):
    for got in world.run(2, _edge_shapes_body):
        assert got[0] == ((4, 0), [2, 2]) and got[1] == ((4, 0), [2, 2])
        assert got[2] is True, got[2]
        assert got[3] == [0.0, 1.0]


@pytest.mark.parametrize("bound,ask", [(0, "all"), (2, "all"), (1, "mixed")])
def test_known_splits_exact_and_headerless_only_where_streams_order_it(world, bound, ask):
    # Header-less only on a stream-ordered transport, and only when every rank asks for it.
    w, iters = 3, 40
    asked = [True] * w if ask == "all" else [True, False, True]
    for bad, headerless, refused, stats in world.run(w, known_body, bound, iters, 3, asked):
        assert bad == []
        assert headerless == (world.stream_ordered and ask == "all")
        if headerless:
            assert "known_splits=True" in refused
        else:
            assert refused is None
        assert stats["posted"] == stats["released"] == iters
        assert 0 <= stats["max_lag"] <= bound + 1


# ------------------------------------------------------------------------------------------------
# bounded


@pytest.mark.parametrize("bound", [0, 2, 4])
def test_bounded_and_b_plus_one_ahead(world, bound):
    w, iters, slow = 3, 14, 1
    results = world.run(w, bounded_body, bound, iters, slow, 0.03, timeout_s=60)
    assert_bounded([r[0] for r in results], bound, slow)
    for r in range(w):
        if r != slow:
            assert results[r][1]["max_lag"] == bound + 1
            assert results[r][1]["waiting_for_data_s"] > 0.2  # it waited on the slow rank


def _outstanding_body(rank, w, bound):
    with channel(bound=bound, timeout=30) as a2a:
        x = torch.ones(w, device=a2a.device)
        handles = [a2a.exchange(x, [1] * w) for _ in range(bound + 1)]
        t0 = time.monotonic()
        with pytest.raises(BoundError, match="outstanding"):
            a2a.exchange(x, [1] * w)
        with pytest.raises(BoundError):
            a2a.send_buffer((w,), torch.float32)
        elapsed = time.monotonic() - t0
        # The refused calls sent nothing: the channel stays in step.
        results = [h.wait()[0].tolist() for h in handles]
        last = a2a.exchange(x * 2, [1] * w).wait()[0].tolist()
    return elapsed, results, last


def test_more_than_b_plus_one_outstanding_raises_at_once(world):
    for elapsed, results, last in world.run(3, _outstanding_body, 2):
        assert elapsed < 1.0
        assert results == [[1.0] * 3] * 3
        assert last == [2.0] * 3


# ------------------------------------------------------------------------------------------------
# live


def _poll_body(rank, w, bound):
    with channel(bound=bound, timeout=30) as a2a:
        got = []
        for k in range(5):
            h = a2a.exchange(torch.full((w,), float(10 * k + rank), device=a2a.device), [1] * w)
            deadline = time.monotonic() + 10
            while not h.done():  # nobody waits: polling alone must bring it to completion
                assert time.monotonic() < deadline, f"iteration {k} never became done"
                time.sleep(0.001)
            got.append(h.wait()[0].tolist())
        return got


@pytest.mark.parametrize("bound", [0, 2])
def test_polling_done_completes_an_iteration_nobody_waits_for(world, bound):
    for got in world.run(2, _poll_body, bound, timeout_s=60):
        assert got == [[10.0 * k, 10.0 * k + 1] for k in range(5)]


# ------------------------------------------------------------------------------------------------
# loud


def _dead_peer_body(rank, w, bound, die_at, timeout, out_dir):
    a2a = channel(bound=bound, timeout=timeout, name="deathwatch")
    pending = []
    try:
        for k in range(50):
            if rank == w - 1 and k == die_at:
                Path(out_dir, "died").write_text(repr(time.monotonic()))
                die()
            pending.append(a2a.exchange(torch.ones(w, 4, device=a2a.device), [1] * w))
            if len(pending) > bound:
                pending.pop(0).wait()
            time.sleep(0.01)
    except PeerError as e:
        return e, time.monotonic()
    return "no error"


def test_a_dead_peer_is_named_on_every_survivor(world, tmp_path):
    w, bound, die_at, timeout = 3, 2, 6, 4.0
    results = world.run(
        w, _dead_peer_body, bound, die_at, timeout, str(tmp_path), return_exceptions=True, timeout_s=60
    )
    died_at = float((tmp_path / "died").read_text())
    world.assert_died(results[w - 1])
    for r in range(w - 1):
        assert isinstance(results[r], tuple), f"rank {r}: {results[r]!r}"
        err, failed_at = results[r]
        assert err.peer == w - 1 and err.channel == "deathwatch"
        assert f"peer {w - 1}" in str(err) and "deathwatch" in str(err)
        assert f"iteration {err.iteration}" in str(err) and 4 <= err.iteration <= 8
        # Within the timeout and the blame's grace (the ranks that saw the failure report it).
        assert failed_at - died_at < timeout + 3.0, "survivors must fail within the timeout"
        if world.name.startswith("local"):  # the fabric tells every peer at once
            assert failed_at - died_at < 1.0 and "closed" in str(err)


def _silent_body(rank, w, timeout):
    a2a = channel(bound=1, timeout=timeout, name="quiet")
    if rank == 0:
        time.sleep(2.5 * timeout)  # never posts: a hung peer, not a dead one
        return "slept"
    t0 = time.monotonic()
    try:
        a2a.exchange(torch.ones(w, device=a2a.device), [1] * w).wait()
    except PeerError as e:
        return e.peer, e.iteration, e.channel, time.monotonic() - t0, str(e)
    return "no error"


def test_a_silent_peer_times_out_naming_it(world):
    timeout = 1.0
    results = world.run(3, _silent_body, timeout, timeout_s=30)
    assert results[0] == "slept"
    for r in (1, 2):
        peer, iteration, name, elapsed, msg = results[r]
        assert (peer, iteration, name) == (0, 0, "quiet")
        assert 0.8 * timeout < elapsed < 2.4 * timeout
        assert "timed out" in msg and "quiet" in msg
        if world.fakes:  # NCCL: the survivors' communicators are aborted, not left hanging
            t = world.fakes[1][r][0]
            assert t.data_comm.aborted and t.header_comm.aborted


# ------------------------------------------------------------------------------------------------
# observable


def _stats_body(rank, w, iters):
    with channel(bound=1, timeout=30, name="observed") as a2a:
        before = a2a.stats()
        for k in range(iters):
            rows = [p + 1 for p in range(w)]  # p + 1 rows of 3 float32 to rank p
            a2a.exchange(torch.full((sum(rows), 3), float(k), device=a2a.device), rows).wait()
        return before, a2a.stats()


def test_stats_count_what_happened(world):
    w, iters, row = 3, 4, 3 * 4
    for rank, (before, after) in enumerate(world.run(w, _stats_body, iters)):
        assert (before["posted"], before["released"], before["arrived"]) == (0, 0, 0)
        assert (after["channel"], after["rank"], after["world_size"], after["bound"]) == (
            "observed",
            rank,
            w,
            1,
        )
        assert after["transport"] == world.transport
        assert after["posted"] == after["released"] == after["arrived"] == iters
        assert after["lag"] == 0 and 0 <= after["max_lag"] <= 2
        # Bytes to and from peers (a rank's own part does not travel).
        assert after["bytes_sent"] == iters * row * sum(p + 1 for p in range(w) if p != rank)
        assert after["bytes_received"] == iters * row * (rank + 1) * (w - 1)
        assert after["blocked_on_bound_s"] >= 0 and after["waiting_for_data_s"] >= 0
