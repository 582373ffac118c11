"""run_world: a local world of CPU processes with torch.distributed set up, for tests and the CLI."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist


class RankError(RuntimeError):
    """A rank of run_world raised or died; `rank` says which, `remote_type` what it raised."""

    def __init__(self, message: str, rank: int, remote_type: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.remote_type = remote_type


class _PrefixWriter(io.TextIOBase):
    """Prefixes every line a rank prints with [rankN], so interleaved logs stay readable."""

    def __init__(self, stream, prefix: str):
        self._stream = stream
        self._prefix = prefix
        self._at_line_start = True

    def write(self, s: str) -> int:
        out = []
        for piece in s.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(s)

    def flush(self) -> None:
        self._stream.flush()


def _child(rank, world_size, port, backend, timeout_s, fn, args, results, release):
    import torch

    sys.stdout = _PrefixWriter(sys.stdout, f"[rank{rank}] ")
    sys.stderr = _PrefixWriter(sys.stderr, f"[rank{rank}] ")
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size + 1, False, timedelta(seconds=timeout_s)
        )
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        try:
            results.put((rank, "ok", pickle.dumps(value)))
        except Exception as e:  # an unpicklable result is the caller's bug; say so
            results.put((rank, "err", ("TypeError", f"result of rank {rank} cannot be pickled: {e}",
                                       "", None)))
    except BaseException as e:  # report everything, SystemExit included
        try:
            blob = pickle.dumps(e)
        except Exception:
            blob = None
        results.put((rank, "err", (type(e).__name__, str(e), traceback.format_exc(), blob)))
    sys.stdout.flush()
    sys.stderr.flush()
    # Stay alive, connections open, until every rank reported: a rank that leaves early would
    # look like a dead peer to the others.
    release.wait(timeout_s)
    os._exit(0)


_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        # Each rank forks from a server that has torch imported: ~10x faster than spawn.
        _ctx.set_forkserver_preload(["torch", "torch.distributed", "blsgpu"])
    return _ctx


def run_world(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    return_exceptions: bool = False,
    grace_s: float = 30.0,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on world_size local processes; return each rank's result.

    Ranks fork from a forkserver, so fn must be importable (defined at module level in a file, not
    in `python -c` or stdin) and args and results picklable.

    Each rank has torch.distributed initialised with `backend` over a loopback TCPStore, runs with
    torch.set_num_threads(1), and prefixes its output with [rankN]. A rank that raises makes
    run_world raise RankError naming the rank (the first failing rank, original exception chained),
    unless return_exceptions=True, which returns the exception in that rank's place. A rank that
    dies without reporting yields RankError with its exit code. Once a rank failed, the others get
    grace_s more to finish (long enough for a BLS channel timeout to name the failed peer), then are
    killed and reported; any rank still running after timeout_s is too. No process outlives the call.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, True, timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    results = ctx.Queue()
    release = ctx.Event()
    procs = [
        ctx.Process(
            target=_child,
            args=(r, world_size, store.port, backend, timeout_s, fn, args, results, release),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    grace_deadline: float | None = None
    try:
        while len(outcome) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
                outcome[rank] = (status, payload)
                continue
            except Exception:  # queue.Empty
                pass
            for r, p in enumerate(procs):
                if r not in outcome and not p.is_alive():
                    # Drain a report that may have raced with the exit.
                    try:
                        while True:
                            rank, status, payload = results.get(timeout=0.2)
                            outcome[rank] = (status, payload)
                    except Exception:
                        pass
                    if r not in outcome:
                        outcome[r] = ("died", p.exitcode)
            failed = any(status != "ok" for status, _ in outcome.values())
            if failed and grace_deadline is None:
                grace_deadline = time.monotonic() + grace_s
            if time.monotonic() > deadline or (
                grace_deadline is not None and time.monotonic() > grace_deadline
            ):
                for r in range(world_size):
                    outcome.setdefault(r, ("timeout", timeout_s))
    finally:
        release.set()
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store

    values: list[Any] = []
    first_error: BaseException | None = None
    for r in range(world_size):
        status, payload = outcome[r]
        if status == "ok":
            values.append(pickle.loads(payload))
            continue
        if status == "err":
            type_name, message, tb, blob = payload
            err = RankError(f"rank {r} raised {type_name}: {message}\n{tb}", r, type_name)
            if blob is not None:
                try:
                    original = pickle.loads(blob)
                    original.rank = r
                    err.__cause__ = original
                    if return_exceptions:
                        err = original
                except Exception:
                    pass
        elif status == "died":
            err = RankError(f"rank {r} died with exit code {payload} before reporting", r)
        elif grace_deadline is not None and time.monotonic() >= grace_deadline:
            err = RankError(
                f"rank {r} was still running {grace_s} s after another rank failed and was killed", r
            )
        else:
            err = RankError(f"rank {r} did not finish within {payload} s and was killed", r)
        values.append(err)
        first_error = first_error or err
    if first_error is not None and not return_exceptions:
        raise first_error
    return values
