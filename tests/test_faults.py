"""Fault injection: `blsgpu run` under torchrun on 3 CPU ranks (gloo), one rank killed (-9) or stopped
(SIGSTOP) inside the exchanges or between two runs (in a barrier). Every survivor must exit non-zero
within the timeout plus a few seconds, naming the failed rank, and no process may be left behind.

Each rank runs this file (see the bottom): it sends its own output to files, patches the fault into
the rank chosen (a SIGKILL or SIGSTOP it sends itself at a precise point, so that "inside the
exchanges" and "between runs" are not left to timing), runs the CLI's main and records its verdict.
torchrun's monitor interval is made long so that the agent does not tear the survivors down before
they fail on their own: each survivor's own exit and message are what is judged. At the end the
test kills what is left (the stopped rank, then torchrun) and checks that every process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

TIMEOUT_S = 5  # --timeout-s: channels, barriers and the process group
SLACK_S = 5  # "within the timeout plus a few seconds" on a loaded 2-core host
CLI_ARGS = (
    "run --iterations 20 --warmup 2 --batch 8 --tables 3 --rows 40 --arch-sparse-feature-size 4 "
    f"--arch-mlp-top 8-1 --delay none --bound 2 --no-progress --timeout-s {TIMEOUT_S}"
).split()
# Runs: sync then bls2. "exchange": the victim stops before generating iteration 10 of the bls2
# run, while its peers wait in the exchanges for its data. "barrier": it stops after the sync run
# closed its channels, before the barrier between the runs.

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# ------------------------------------------------------------------------------ one rank


def _install_fault(action: str, where: str, out_dir: Path) -> None:
    from blsgpu.bench import runner
    from blsgpu.dlrm import data

    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    state = {"barrier": None}

    def fault():
        (out_dir / "fault").write_text(str(time.time()))
        os.kill(os.getpid(), sig)

    original_barrier = runner._barrier

    def barrier(name, cfg):
        if where == "barrier" and name == "sync:0 end":
            fault()
        original_barrier(name, cfg)
        state["barrier"] = name

    original_batch = data.SyntheticCriteo.batch

    def batch(self, rank, iteration):
        if where == "exchange" and state["barrier"] == "bls2:0 start" and iteration == 10:
            fault()
        return original_batch(self, rank, iteration)

    runner._barrier = barrier
    data.SyntheticCriteo.batch = batch


def _rank_main(argv: list[str]) -> None:
    fault, out = argv[0], Path(argv[1])
    action, victim, where = fault.split(":")
    rank = int(os.environ["RANK"])
    for fd, name in ((1, "out"), (2, "err")):
        f = os.open(out / f"rank{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    if rank == int(victim):
        _install_fault(action, where, out)
    from blsgpu import cli

    verdict = {"rank": rank, "code": 1, "type": None, "peer": None, "message": ""}
    try:
        verdict["code"] = cli.main(argv[2:])
    except SystemExit as e:
        verdict["code"] = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        traceback.print_exc()
        verdict.update(type=type(e).__name__, peer=getattr(e, "peer", None), message=str(e))
    verdict["t"] = time.time()
    (out / f"rank{rank}.json").write_text(json.dumps(verdict))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(verdict["code"])


# ------------------------------------------------------------------------------ the harness


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, exit status) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[-1])  # ppid, state, exit_code (Linux >= 3.5)


def _children(ppid: int) -> dict[int, int]:
    """{RANK: pid} of ppid's children that are torchrun workers."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is None or st[0] != ppid:
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(entry.name)
    return out


def _gone_or_exited(pid: int) -> bool:
    st = _stat(pid)
    return st is None or st[1] in "ZX"


def _kill_group(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "action, victim, where", [("kill", 2, "exchange"), ("stop", 1, "exchange"), ("stop", 0, "barrier")]
)
def test_survivors_name_the_failed_rank_and_nothing_is_left(action, victim, where, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "3",
        "--monitor-interval",
        "600",
        __file__,
        f"{action}:{victim}:{where}",
        str(tmp_path),
        *CLI_ARGS,
    ]
    log = open(tmp_path / "torchrun.log", "w")
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    workers: dict[int, int] = {}
    exited: dict[int, float] = {}
    t_fault = None
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 3 and time.monotonic() < deadline:
            assert launcher.poll() is None, (tmp_path / "torchrun.log").read_text()
            workers = _children(launcher.pid)
            time.sleep(0.1)
        assert len(workers) == 3, f"torchrun started {workers}"
        survivors = [r for r in workers if r != victim]
        marker = tmp_path / "fault"
        while t_fault is None and time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                t_fault = float(marker.read_text())
            elif all(_gone_or_exited(workers[r]) for r in survivors):
                break
            time.sleep(0.05)
        assert t_fault is not None, "the fault never fired:\n" + _logs(tmp_path)
        until = time.time() + TIMEOUT_S + SLACK_S + 10
        while len(exited) < len(survivors) and time.time() < until:
            for r in survivors:
                if r not in exited and _gone_or_exited(workers[r]):
                    exited[r] = time.time()
            time.sleep(0.05)
        codes = {r: _stat(workers[r]) for r in survivors}
    finally:
        # The victim first (a stopped process ignores everything but SIGKILL), then the launcher,
        # which reaps its workers; then anything still there.
        if victim in workers:
            _kill_group(workers[victim])
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        left = [pid for pid in [launcher.pid, *workers.values()] if _stat(pid) is not None]
        for pid in [*workers.values(), launcher.pid]:
            _kill_group(pid)
        launcher.wait(timeout=10)
        log.close()

    text = _logs(tmp_path)
    assert set(exited) == set(survivors), (
        f"survivors still running: {sorted(set(survivors) - set(exited))}\n{text}"
    )
    for r in survivors:
        took = exited[r] - t_fault
        assert took <= TIMEOUT_S + SLACK_S, f"rank {r} exited {took:.1f} s after the fault\n{text}"
        verdict = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert verdict["code"] != 0, verdict
        assert verdict["type"] == "PeerError" and verdict["peer"] == victim, verdict
        assert f"{'rank' if where == 'barrier' else 'peer'} {victim}" in verdict["message"], verdict
        st = codes[r]
        if st is not None and st[1] == "Z":  # not yet reaped: its exit status is readable
            assert os.WEXITSTATUS(st[2]) != 0 or os.WIFSIGNALED(st[2]), st
    assert left == [], f"processes left behind after torchrun was stopped: {left}"
    assert all(_stat(pid) is None for pid in [launcher.pid, *workers.values()])


def _logs(out: Path) -> str:
    parts = []
    for p in sorted(out.glob("rank*.err")) + [out / "torchrun.log"]:
        if p.exists():
            parts.append(f"--- {p.name}\n{p.read_text()[-3000:]}")
    return "\n".join(parts)


if __name__ == "__main__":  # one rank, started by torchrun
    _rank_main(sys.argv[1:])
