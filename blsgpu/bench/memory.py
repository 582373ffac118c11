"""How much memory a `blsgpu run/bench` needs, and how much this machine can give.

The command refuses, before any rank starts, a configuration whose estimate exceeds what is
available: a world that runs out of memory half way through dies without naming the flag to blame.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from blsgpu.bench.runner import BenchConfig

__all__ = ["RANK_BASE_BYTES", "available_memory", "gib", "memory_estimate"]

RANK_BASE_BYTES = 300 << 20  # a rank with torch, gloo and the channels' threads, before data


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def memory_estimate(cfg: BenchConfig, ranks_here: int, launcher: bool) -> tuple[int, dict]:
    """Bytes a run of cfg needs on this machine (ranks_here ranks, plus the launcher of a local
    world), and the per-rank parts by name. An estimate from above of what grows with the flags."""
    sizes = cfg.embedding_sizes
    arch = cfg.arch
    W, T, D, N = cfg.world_size, len(sizes), arch.sparse_feature_size, cfg.batch
    K = cfg.iterations
    L = cfg.pooling + 4 * math.sqrt(cfg.pooling) + 1  # Poisson lengths, with their tail
    B = max(cfg.bounds)
    runs = len(cfg.labels()) * cfg.repeats
    tables = [n * D * 4 for n in sizes]
    ids = N * T * (L + 1) * 8  # one batch's ids and lengths (int64)
    pooled = N * T * D * 4  # its pooled embeddings (float32)

    def mlp(widths):
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True)) * 4

    parts = {
        "the process (torch, gloo, threads)": RANK_BASE_BYTES,
        "the id generator (8 bytes per row of every table, --rows)": (8 * sum(sizes) if cfg.alpha > 0 else 0),
        # A table is built whole on its owner, then copied: twice its share, at least the largest.
        "the embedding tables (--rows x --arch-sparse-feature-size)": 2 * max(max(tables), sum(tables) / W),
        "the dense MLPs (--arch-mlp-bot, --arch-mlp-top, --tables)": mlp(arch.bottom) + mlp(arch.top),
        "the batches in flight (--batch, --tables, --pooling, --bound)": (B + 3) * 4 * (ids + pooled),
        "predictions, timings and delays (--iterations, --warmup, --repeats)": (
            3 * (K + cfg.warmup) * N * 4 + runs * K * 200 + 2 * W * K * 8
        ),
    }
    total = ranks_here * sum(parts.values())
    if launcher:  # the launcher holds every rank's timings
        total += RANK_BASE_BYTES + W * runs * K * 200
    return int(total), parts
