"""The in-process multi-rank mode (blsgpu.transport.local) on CPU: W ranks as threads, the same engine.

What the GPU runs as W stream sets on one device runs here as W threads with host copies; with
emulate_streams the engine takes its stream-ordered path (hand-over through order(), device counters
over host-emulated stream operations), as on a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from _contract import assert_bounded, bounded_body, drive, reference

from blsgpu import BoundedLagAllToAll, PeerError
from blsgpu.errors import BoundError
from blsgpu.transport.local import current_group, run_local
from blsgpu.world import RankError

MODES = {  # name -> run_local options
    "host": {},
    "loopback": {"loopback": True},
    "streams": {"loopback": True, "emulate_streams": True},
}


def _exact_body(rank, w, bound, iters, seed):
    width = 8

    def expected(k):
        return reference(seed, k, rank, w, width)

    with BoundedLagAllToAll(bound=bound, timeout=30) as a2a:
        return drive(a2a, rank, w, iters, seed, width, expected, mean_delay_s=0.0005), a2a.stats()


@pytest.mark.parametrize(
    "bound,mode", [(0, "host"), (1, "loopback"), (4, "host"), (4, "streams"), (0, "streams")]
)
def test_exact_at_w4_under_seeded_delays(bound, mode):
    w, iters = 4, 120
    results = run_local(w, _exact_body, bound, iters, 31 + bound, timeout_s=120, **MODES[mode])
    for rank, (bad, stats) in enumerate(results):
        assert bad == [], f"rank {rank}: iterations differ from the synchronous reference: {bad[:10]}"
        assert stats["transport"] == "local"
        assert stats["posted"] == stats["released"] == stats["arrived"] == iters
        assert 0 <= stats["max_lag"] <= bound + 1
        if mode == "streams":  # the device counters (host-emulated streams) count the same
            dev = stats["device"]
            assert (dev["posted"], dev["arrived"], dev["released"]) == (iters, iters, iters)
            assert dev["stream_ops"] == "host_emulation" and not dev["wait_timed_out"]


@pytest.mark.parametrize("mode", ["host", "streams"])
@pytest.mark.parametrize("bound", [0, 2, 4])
def test_bounded_and_b_plus_one_ahead(bound, mode):
    w, iters, slow = 3, 14, 1
    results = run_local(w, bounded_body, bound, iters, slow, 0.03, timeout_s=60, **MODES[mode])
    assert_bounded([r[0] for r in results], bound, slow)
    for r in range(w):
        if r == slow:
            continue
        assert results[r][1]["max_lag"] == bound + 1
        assert results[r][1]["waiting_for_data_s"] > 0.2


def _known_exact_body(rank, w, bound, iters, seed):
    width = 4
    bad = []
    with BoundedLagAllToAll(bound=bound, timeout=30, known_splits=True) as a2a:
        pending = []
        for k in range(iters):
            g = torch.Generator().manual_seed(seed * 1000 + k)
            m = torch.randint(0, 4, (w, w), generator=g)
            n = int(m[rank].sum())
            send = torch.arange(n * width, dtype=torch.float64).view(n, width) + 1e4 * rank + k
            pending.append((k, m, a2a.exchange(send, m[rank].tolist(), m[:, rank].tolist())))
            if len(pending) > bound:
                k0, m0, h = pending.pop(0)
                recv, splits = h.wait()
                want = torch.cat([(torch.arange(int(m0[s].sum()) * width, dtype=torch.float64)
                                   .view(-1, width) + 1e4 * s + k0)
                                  [int(m0[s, :rank].sum()): int(m0[s, : rank + 1].sum())]
                                  for s in range(w)])
                if splits != m0[:, rank].tolist() or not torch.equal(recv, want):
                    bad.append(k0)
            time.sleep(0.0005 * ((rank + k) % 3))
        for _, _, h in pending:
            h.wait()
        return bad, a2a._known, a2a.stats()


@pytest.mark.parametrize("mode,known", [("streams", True), ("host", False)])
def test_known_splits_exact_headerless_only_on_the_stream_ordered_path(mode, known):
    iters = 40
    for bad, headerless, stats in run_local(3, _known_exact_body, 2, iters, 3, timeout_s=60,
                                            **MODES[mode]):
        assert bad == [] and headerless == known
        assert stats["posted"] == stats["released"] == iters


def _outstanding_body(rank, w, bound):
    with BoundedLagAllToAll(bound=bound, timeout=10) as a2a:
        handles = [a2a.exchange(torch.ones(w), [1] * w) for _ in range(bound + 1)]
        try:
            a2a.exchange(torch.ones(w), [1] * w)
            refused = False
        except BoundError:
            refused = True
        got = [h.wait()[0].tolist() for h in handles]
    return refused, got


def test_more_than_b_plus_one_outstanding_raises():
    for refused, got in run_local(3, _outstanding_body, 2):
        assert refused and got == [[1.0] * 3] * 3


def _dies_body(rank, w, die_rank):
    a2a = BoundedLagAllToAll(bound=1, timeout=20, name="local-death")
    for k in range(20):
        if rank == die_rank and k == 5:
            raise KeyError("boom")
        a2a.exchange(torch.ones(w), [1] * w).wait()
    a2a.close()


def test_a_failing_rank_fails_its_peers_at_once():
    t0 = time.monotonic()
    results = run_local(3, _dies_body, 2, timeout_s=60, return_exceptions=True)
    assert time.monotonic() - t0 < 10, "peers must fail at once, not after the timeout"
    assert isinstance(results[2], KeyError)
    for r in (0, 1):
        err = results[r]
        assert isinstance(err, PeerError), repr(err)
        assert err.peer == 2 and err.channel == "local-death" and err.iteration in (5, 6)
        assert "closed" in str(err)
    with pytest.raises(RankError, match="rank 2 raised KeyError"):
        run_local(3, _dies_body, 2, timeout_s=60)


def _silent_body(rank, w):
    a2a = BoundedLagAllToAll(bound=1, timeout=1.0, name="quiet")
    if rank == 0:
        time.sleep(2.5)
        return "slept"
    t0 = time.monotonic()
    try:
        a2a.exchange(torch.ones(w), [1] * w).wait()
    except PeerError as e:
        return e.peer, e.iteration, time.monotonic() - t0, str(e)
    return "no error"


def test_a_silent_rank_times_out_naming_it():
    results = run_local(3, _silent_body, timeout_s=30)
    assert results[0] == "slept"
    for r in (1, 2):
        peer, iteration, elapsed, msg = results[r]
        assert (peer, iteration) == (0, 0) and 0.8 < elapsed < 2.4
        assert "timed out" in msg and "quiet" in msg


def _group_body(rank, w):
    g = current_group()
    with BoundedLagAllToAll(group=g, bound=0, transport="local") as a2a:
        recv, _ = a2a.exchange(torch.tensor([float(rank)] * w), [1] * w).wait()
    return g.rank(), g.size(), recv.tolist()


def test_explicit_group_and_no_group_outside_a_local_world():
    assert current_group() is None
    assert run_local(2, _group_body) == [(0, 2, [0.0, 1.0]), (1, 2, [0.0, 1.0])]
    with pytest.raises(ValueError, match="needs a group of blsgpu.transport.local.run_local"):
        BoundedLagAllToAll(transport="local")
    with pytest.raises(ValueError, match="emulate_streams is for CPU"):
        run_local(2, _group_body, device="cuda", emulate_streams=True)
