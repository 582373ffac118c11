"""Channels over a process's life: abandoned ones leave the group healthy, ids never run out,
inputs that would be misread are refused before anything is sent. (Liveness, polling included, is
the contract's: tests/test_contract.py.)"""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch
import torch.distributed as dist

from blsgpu import BoundedLagAllToAll, PeerError, run_world


def _resources() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _abandon_body(rank, w):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="leave"):
        with BoundedLagAllToAll(bound=1, timeout=1.0, name="abandoned") as a2a:
            if rank == 0:
                a2a.exchange(torch.ones(w, 2), [1] * w)  # never matched: rank 1 does not post
            raise RuntimeError("leave")
    left = time.monotonic() - t0
    checks = []
    end = time.monotonic() + 3.5  # several timeouts of the abandoned channel
    while time.monotonic() < end:
        t = torch.ones(1)
        dist.all_reduce(t)
        checks.append(t.item() == w)
        with BoundedLagAllToAll(bound=1, timeout=10) as a2a:
            recv, _ = a2a.exchange(torch.full((w, 1), float(rank)), [1] * w).wait()
            checks.append(recv.flatten().tolist() == [float(p) for p in range(w)])
        time.sleep(0.4)
    return left, checks


def test_abandoned_channel_leaves_the_group_and_new_channels_working():
    # Before channels owned their connections, the unmatched post timed out after 1 s and closed
    # the pair that the group's collectives and every later channel shared.
    for left, checks in run_world(2, _abandon_body, timeout_s=60):
        assert left < 0.5, f"leaving the channel took {left:.2f} s"
        assert len(checks) >= 10 and all(checks), checks


def _many_channels_body(rank, w):
    from blsgpu.transport import base as _transport

    # Far past the 8,192 channel ids one group used to have.
    _transport._channel_counts[_transport._group_key(None)] = itertools.count(1 << 20)
    with BoundedLagAllToAll(bound=0, timeout=30) as a2a:
        first = a2a.exchange(torch.full((w,), float(rank)), [1] * w).wait()[0].tolist()
    before = _resources()
    for i in range(40):  # e.g. a service that rebuilds its collection on every model reload
        with BoundedLagAllToAll(bound=1, timeout=30) as a2a:
            recv, _ = a2a.exchange(torch.full((w,), float(i)), [1] * w).wait()
            assert recv.tolist() == [float(i)] * w
    return first, before, _resources()


def test_channels_can_be_created_and_closed_without_limit_or_leak():
    for first, before, after in run_world(2, _many_channels_body, timeout_s=120):
        assert first == [0.0, 1.0]
        assert after == before, f"descriptors, threads before {before}, after 40 channels {after}"


def _misread_inputs_body(rank, w):
    a2a = BoundedLagAllToAll(bound=1, timeout=30)
    x = torch.arange(4.0).view(2, 2)
    seen = []
    cases = [
        (TypeError, "sequence of ints", lambda: a2a.exchange(x, {0: 2})),  # keys would be read
        (TypeError, "sequence of ints", lambda: a2a.exchange(x, {2})),
        (TypeError, "sequence of ints", lambda: a2a.exchange(x, [2], {0: 2})),
        (ValueError, "meta device", lambda: a2a.exchange(torch.empty(2, 2, device="meta"), [2])),
        (TypeError, "dense", lambda: a2a.exchange(x.to_sparse(), [2])),
    ]
    for exc, text, call in cases:
        with pytest.raises(exc) as e:
            call()
        seen.append(text in str(e.value) or str(e.value))
    recv, splits = a2a.exchange(x, [2]).wait()  # nothing was sent: still iteration 0
    a2a.close()
    return seen, recv.tolist(), splits, a2a.stats()["posted"]


def test_inputs_that_would_be_misread_are_refused_before_sending():
    seen, recv, splits, posted = run_world(1, _misread_inputs_body)[0]
    assert seen == [True] * 5, seen
    assert recv == [[0.0, 1.0], [2.0, 3.0]] and splits == [2] and posted == 1


def _late_creator_body(rank, w):
    if rank == 2:
        time.sleep(3.0)  # silent while the others create a channel
        return "late"
    t0 = time.monotonic()
    try:
        BoundedLagAllToAll(bound=1, timeout=1.0, name="late-peer")
    except PeerError as e:
        return e.peer, e.channel, str(e), time.monotonic() - t0
    return "created"


def test_a_rank_that_never_creates_the_channel_is_named():
    results = run_world(3, _late_creator_body, timeout_s=60, return_exceptions=True, grace_s=10)
    assert results[2] == "late"
    for r in (0, 1):
        peer, channel, msg, elapsed = results[r]
        assert (peer, channel) == (2, "late-peer") and "channel creation" in msg, msg
        assert 0.9 < elapsed < 3.0
