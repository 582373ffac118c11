"""CuPy's NCCL for the GPU transport: loading it, checking its libnccl against torch's, and
creating communicators whose unique id travels through the group's store.

CuPy (and so libnccl) loads only when a channel with transport "nccl" is built; its libnccl is then
compared with the one torch uses: two builds in one process is a known source of hangs and
crashes, so the first import warns, and check_libnccl() says what it found.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from typing import Any

import torch

INSTALL_HINT = "pip install 'blsgpu[cuda12]' (CUDA 12) or 'blsgpu[cuda13]' (CUDA 13)"

_nccl_module: Any = None
_nccl_lock = threading.Lock()
_nccl_check: str | None = None  # the libnccl mismatch found at first use, if any


def import_nccl() -> Any:
    """cupy.cuda.nccl, imported once; the first import checks which libnccl CuPy loaded."""
    global _nccl_module, _nccl_check
    with _nccl_lock:
        if _nccl_module is not None:
            return _nccl_module
        torch_libs = loaded_libnccl()
        try:
            import cupy  # noqa: F401 (cupy.cuda.nccl needs the package initialised)
            from cupy.cuda import nccl
        except Exception as e:
            raise ImportError(
                f"transport 'nccl' needs CuPy with its NCCL bindings, which could not be imported "
                f"({type(e).__name__}: {e}); install them with: {INSTALL_HINT}"
            ) from e
        if not getattr(nccl, "available", True):
            raise ImportError(f"this CuPy was built without NCCL; install: {INSTALL_HINT}")
        cupy_version = nccl.get_version()  # loads libnccl if CuPy defers it
        _nccl_check = libnccl_mismatch(torch_libs, loaded_libnccl(), torch_nccl_version(), cupy_version)
        if _nccl_check is not None:
            warnings.warn(_nccl_check, RuntimeWarning, stacklevel=3)
        _nccl_module = nccl
        return nccl


def available() -> bool:
    """True when CuPy's NCCL bindings import (only asked where a CUDA device exists)."""
    try:
        import_nccl()
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# which libnccl: one per process, or say which two


# libnccl.so, libnccl.so.2, libnccl.so.2.27.3; not the plugins (libnccl-net.so, libnccl-tuner.so).
_LIBNCCL = re.compile(r"(?:^|/)libnccl\.so(?:\.[0-9]+)*$")


def loaded_libnccl(maps: str | None = None) -> list[str]:
    """Real paths of the libnccl files mapped into this process (from /proc/self/maps), in order."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return []
    seen: list[str] = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].strip()
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        if _LIBNCCL.search(path):
            real = os.path.realpath(path) if os.path.exists(path) else path
            if real not in seen:
                seen.append(real)
    return seen


def nccl_version_str(version: Any) -> str:
    """'2.27.3' from NCCL's version code (22703, or 2703 before 2.9) or torch's (2, 27, 3)."""
    if version is None:
        return "unknown"
    if isinstance(version, (tuple, list)):
        return ".".join(str(int(v)) for v in version)
    code = int(version)
    if code >= 10000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


def libnccl_mismatch(
    torch_libs: list[str], cupy_libs: list[str], torch_version: Any = None, cupy_version: Any = None
) -> str | None:
    """A message naming both libraries when CuPy and torch use different libnccl builds, else None.

    Args:
        torch_libs: libnccl files mapped before CuPy's NCCL was imported (what torch loaded).
        cupy_libs: libnccl files mapped after it was imported (torch's and CuPy's).
        torch_version, cupy_version: the NCCL versions each reports (code or tuple).
    """
    tv, cv = nccl_version_str(torch_version), nccl_version_str(cupy_version)
    fix = (
        "One libnccl per process: point CuPy at torch's (e.g. preload it with LD_PRELOAD, or "
        "install the nvidia-nccl wheel that torch requires) so both use the same build."
    )
    if len(torch_libs) > 1:
        return (
            f"two libnccl builds are loaded: {torch_libs[0]} and {torch_libs[1]} "
            f"(torch reports NCCL {tv}, CuPy NCCL {cv}). {fix}"
        )
    extra = [p for p in cupy_libs if p not in torch_libs]
    if torch_libs and extra:
        return (
            f"CuPy loaded {extra[0]} (NCCL {cv}) but torch uses {torch_libs[0]} (NCCL {tv}): "
            f"two libnccl builds in one process. {fix}"
        )
    if "unknown" not in (tv, cv) and tv != cv:
        mine = cupy_libs[0] if cupy_libs else "a libnccl not found in /proc/self/maps"
        theirs = torch_libs[0] if torch_libs else "NCCL linked into torch itself"
        return (
            f"torch uses NCCL {tv} ({theirs}) but CuPy uses NCCL {cv} ({mine}): two libnccl "
            f"builds in one process. {fix}"
        )
    return None


def check_libnccl() -> str | None:
    """The libnccl mismatch found when CuPy's NCCL was first imported (None: one libnccl)."""
    import_nccl()
    return _nccl_check


def torch_nccl_version() -> Any:
    """The NCCL version torch was built with (None where torch has no NCCL)."""
    try:
        return torch.cuda.nccl.version()
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------
# unique id through the group's store


def uid_to_bytes(uid: Any) -> bytes:
    """Serialize CuPy's unique id for a store, exactly as the other ranks must pass it back.

    CuPy gives bytes, or a tuple of C chars: signed (-128..127) on x86-64, unsigned (0..255)
    where char is unsigned (aarch64); NcclCommunicator wants the same convention back.
    """
    if isinstance(uid, (bytes, bytearray)):
        return b"b" + bytes(uid)
    values = [int(x) for x in uid]
    if any(not -128 <= v <= 255 for v in values):
        raise ValueError("an NCCL unique id holds chars (-128..255)")
    kind = b"t" if any(v < 0 for v in values) else b"u"
    return kind + bytes(v & 0xFF for v in values)


def uid_from_bytes(raw: bytes) -> Any:
    """The unique id uid_to_bytes serialized, in the convention CuPy gave it."""
    kind, body = raw[:1], raw[1:]
    if kind == b"b":
        return bytes(body)
    if kind == b"t":
        return tuple(b - 256 if b > 127 else b for b in body)
    if kind == b"u":
        return tuple(body)
    raise ValueError(f"not a serialized NCCL unique id (marker {kind!r})")


def make_comm(nccl: Any, store: Any, key: str, rank: int, world_size: int, index: int) -> Any:
    """A communicator of `world_size` ranks on CUDA device `index` (collective): rank 0 makes the
    unique id and sets it under `key`, the others read it there."""
    import cupy

    if rank == 0:
        uid = nccl.get_unique_id()
        store.set(key, uid_to_bytes(uid))
    else:
        uid = uid_from_bytes(store.get(key))
    with cupy.cuda.Device(index):
        return nccl.NcclCommunicator(world_size, uid, rank)
