"""The `blsgpu` command's argument types and limits: a flag's value is refused as it is parsed, with
the reason, before any work starts; output paths are probed the same way."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from blsgpu.bench.delays import DelayModel

# Upper bounds of the flags. Beyond them a number is a typo, not a job; below them, the memory the
# configuration needs is estimated and checked against what this machine has (_check_memory).
MAX_PEER_TIMEOUT_S = 300  # a channel's (and a barrier's) timeout: min(--timeout-s, this)
MAX_DELAY_MS = MAX_PEER_TIMEOUT_S * 1e3  # an injected delay per iteration, at most
MAX_LOCAL_WORLD = 1024
MAX_SEED = 2**32 - 1  # table t's generator is seeded with seed * 1_000_003 + t: stays < 2**64
MAX_ROWS = 2**31  # the synthetic data's row permutation stays inside int64
MAX_ITERATIONS = 10**9
MAX_TIME_MS = 1e9  # simulate's --base-ms / --comm-ms: finite arithmetic


def int_at_least(lo: int, what: str, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{what} must be <= {hi}, got {v}")
        return v

    return parse


def probe_file(path: Path) -> None:
    """Create and remove path (an existing file is opened for appending, not truncated)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if not path.is_file():
            raise IsADirectoryError(21, "it is not a regular file") from None
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        return
    os.close(fd)
    os.unlink(path)


def check_out_paths(
    parser: argparse.ArgumentParser, *flags: tuple[str, str | None], probe: bool = True
) -> None:
    """Refuse, before any work, an output file (flag, path) that cannot be written: the file is
    created and removed (an existing one is opened for appending; probe=False: not touched)."""
    for flag, path in flags:
        if path is None:
            continue
        if not path.strip():
            parser.error(f"{flag} needs a path, got {path!r}")
        if Path(path).is_dir():
            parser.error(f"cannot write {path}: it is a folder")
        if not Path(path).resolve().parent.is_dir():
            parser.error(f"cannot write {path}: its folder does not exist")
        if not probe:
            continue
        try:
            probe_file(Path(path))
        except OSError as e:
            parser.error(f"cannot write {path} ({flag}): {e.strerror or e}")


def check_out_dir(parser: argparse.ArgumentParser, flag: str, path: str | None, keep: bool = False) -> None:
    """Refuse a folder (e.g. --trace) in which no file can be written: folders that are missing
    are created, a file is created and removed in it, and the folders created are removed (kept
    with keep=True: other processes may be probing them at the same time)."""
    if path is None:
        return
    if not path.strip():
        parser.error(f"{flag} needs a folder, got {path!r}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        parser.error(f"cannot write into {path} ({flag}): it is not a folder")
    created = []
    try:
        for d in reversed([folder, *folder.parents]):
            if not d.exists():
                try:
                    d.mkdir()
                except FileExistsError:  # made by another rank meanwhile
                    continue
                created.append(d)
        probe_file(folder / f".blsgpu-probe-{os.getpid()}")
    except OSError as e:
        parser.error(f"cannot write into {path} ({flag}): {e.strerror or e}")
    finally:
        for d in [] if keep else reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def nonneg_float(what: str, hi: float | None = None):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{what} must be finite and >= 0, got {text!r}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{what} must be <= {hi:g}, got {text!r}")
        return v

    return parse


def int_list(what: str, lo: int, hi: int):
    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be comma-separated integers like 0,1,2,4,8, got {text!r}"
            ) from None
        bad = [v for v in values if not lo <= v <= hi]
        if bad:
            raise argparse.ArgumentTypeError(f"{what} must lie in [{lo}, {hi}], got {bad}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{what} has repeated values: {text!r}")
        return values

    return parse


def delay_spec(text: str) -> str:
    try:
        model = DelayModel.parse(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    times = {"exp": (0,), "straggler": (1,), "rotate": (0,), "spikes": (1,)}.get(model.kind, ())
    for i in times:
        if model.params[i] > MAX_DELAY_MS:
            raise argparse.ArgumentTypeError(
                f"--delay {text}: {model.params[i]:g} ms per iteration is more than "
                f"{MAX_DELAY_MS:g} ms, longer than any peer waits (a channel's timeout is at "
                f"most {MAX_PEER_TIMEOUT_S} s)"
            )
    return str(model)


def arch_spec(what: str):
    from blsgpu.dlrm.model import parse_arch

    def parse(text: str) -> tuple[int, ...]:
        try:
            return parse_arch(text, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
