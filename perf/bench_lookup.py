"""Fused pooled lookup (blsgpu.pooled_lookup) vs per-table torch embedding_bag + torch.cat.

One lookup: T tables of --rows rows, N bags per table, bag sizes uniform in [0, 2L] (mean L), ids
uniform over the rows, output [N, T*D]. x = D (--dims); one series per provider and table dtype.

Figures, defined once and printed the same way for every run:
- time: median (and 20th/80th percentiles) over --reps lookups. CPU: thread CPU time when --threads
  is 1 (every provider then runs on the calling thread, and a loaded host does not count), else wall
  time. GPU: CUDA events around each lookup after warm-up. Before every timed lookup --flush-mb MiB
  are written (default 64 on CPU, 256 on GPU; 0 turns it off) so that no provider finds the
  previous one's rows in cache. On CPU that also evicts the code of the call, which charges each
  distinct library call path some tens of microseconds ("cold"); with --flush-mb 0 tables small
  enough for the last-level cache stay there ("warm").
- bytes moved = ids read (nnz x id bytes) + offsets read ((T*N + 1) x offset bytes) + rows read
  (nnz x row bytes: D x dtype bytes, or D + 8 for int8 row-wise) + output written (N x T*D x output
  bytes). Reads a lookup cannot avoid; caches may serve some of them.
- GB/s = bytes moved / time (10^9 bytes). On GPU also % of HBM peak (--hbm-peak-gbs, else looked up
  from the device name).
- speedup = median over reps of (torch-naive time / provider time) within the rep: every rep runs
  each provider once, in a seeded random order.

Providers: blsgpu-torch (backend="torch", default validation), blsgpu-torch-noval (the same with
validate=False: what the checks cost), torch-naive (per-table
F.embedding_bag, or the FBGEMM int8 op, then torch.cat); on GPU also blsgpu-triton (backend="triton",
validate=False: the kernel alone; validation is a host sync). Outputs are checked against each other
before timing. GPU targets (issue 3): D=128 fp16 L=20, blsgpu-triton >= 70% of HBM peak and >= 1.5x
torch-naive.

Usage: python perf/bench_lookup.py [--device cpu|cuda] [--dims 16,32,64,128] [--dtypes fp32,fp16]
       [--tables 8] [--batch 2048] [--pooling 20] [--rows 100000] [--reps 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blsgpu import _provenance
from blsgpu.bench.record import Provenance, Record, write_report
from blsgpu.embedding._jagged import offsets_of
from blsgpu.lookup import QuantizedTable, pooled_lookup

NAME = "bench_lookup"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": None}
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}
# Nominal HBM bandwidth, GB/s, by a substring of torch.cuda.get_device_name() (first match wins).
HBM_PEAK_GBS = [
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0),
]  # fmt: skip
TARGET_PEAK_FRACTION = 0.70
TARGET_SPEEDUP = 1.5


def _machine(device: str, threads: int) -> dict:
    info = _provenance.machine(threads=threads)
    if device == "cuda":
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def _hbm_peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((gbs for key, gbs in HBM_PEAK_GBS if key in name), None)


def _make(cfg: dict, dim: int, dtype_name: str, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    t_count, n, pooling, rows = cfg["tables"], cfg["batch"], cfg["pooling"], cfg["rows"]
    tables = []
    for _ in range(t_count):
        w = torch.randn(rows, dim, generator=g)
        table = QuantizedTable.from_float(w) if dtype_name == "int8" else w.to(DTYPES[dtype_name])
        tables.append(table.to(device))
    lengths = torch.randint(0, 2 * pooling + 1, (t_count * n,), generator=g)
    offsets = offsets_of(lengths)
    indices = torch.randint(0, rows, (int(offsets[-1]),), generator=g)
    return tables, indices.to(device), offsets.to(device)


def _naive(tables, indices, offsets, n):
    """The baseline: per-table embedding_bag (the FBGEMM int8 op for int8 tables), then torch.cat."""
    bounds = offsets[::n].tolist()
    outs = []
    for t, table in enumerate(tables):
        a, b = bounds[t], bounds[t + 1]
        offs = offsets[t * n : (t + 1) * n + 1] - a
        if isinstance(table, QuantizedTable):
            outs.append(
                torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                    table.data, indices[a:b], offs, False, 0, False, None, None, True
                )
            )
        else:
            outs.append(F.embedding_bag(indices[a:b], table, offs, mode="sum", include_last_offset=True))
    return torch.cat(outs, dim=1)


def _bytes_moved(tables, indices, offsets, out) -> int:
    n = out.shape[0]
    bounds = offsets[::n].tolist()
    rows_read = 0
    for t, table in enumerate(tables):
        row_bytes = (
            table.data.shape[1]
            if isinstance(table, QuantizedTable)
            else (table.shape[1] * table.element_size())
        )
        rows_read += (bounds[t + 1] - bounds[t]) * row_bytes
    return (
        indices.numel() * indices.element_size()
        + offsets.numel() * offsets.element_size()
        + rows_read
        + out.numel() * out.element_size()
    )


def _providers(device: str, dtype_name: str):
    provs = {
        "blsgpu-torch": lambda tb, i, o, n: pooled_lookup(tb, i, o, backend="torch"),
        "blsgpu-torch-noval": lambda tb, i, o, n: pooled_lookup(tb, i, o, backend="torch", validate=False),
    }
    if device == "cuda":
        provs["blsgpu-triton"] = lambda tb, i, o, n: pooled_lookup(tb, i, o, backend="triton", validate=False)
    if not (dtype_name == "int8" and device == "cuda"):  # no torch int8 bag on CUDA
        provs["torch-naive"] = _naive
    return provs


class _Timer:
    """Times one call: CUDA events on GPU, thread CPU time or wall time on CPU."""

    def __init__(self, device: str, cpu_clock: str, flush_mb: int):
        self.device, self.cpu_clock = device, cpu_clock
        # Written before every timed call (untimed) so that the previous call's rows, ids and
        # offsets are not in cache: every provider starts cold, whatever ran before it.
        self.flush = torch.empty(flush_mb * 2**20, dtype=torch.int8, device=device) if flush_mb else None

    def __call__(self, fn) -> float:
        if self.flush is not None:
            self.flush.fill_(1)
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        clock = time.thread_time if self.cpu_clock == "thread" else time.perf_counter
        t0 = clock()
        fn()
        return clock() - t0


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _measure(provs: dict, args: tuple, timer: _Timer, warmup: int, reps: int, seed: int) -> dict:
    """Per provider, the time of each of `reps` calls; every rep runs the providers in a new
    (seeded) random order, so that no provider always follows the same one."""
    for fn in provs.values():  # warm-up (Triton compiles here)
        for _ in range(warmup):
            fn(*args)
    times = {name: [] for name in provs}
    order = list(provs)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            times[name].append(timer(lambda fn=provs[name]: fn(*args)))
    return times


def run(cfg: dict) -> list[dict]:
    device = cfg["device"]
    timer = _Timer(device, cfg["cpu_clock"], cfg["flush_mb"])
    peak = _hbm_peak(torch.cuda.get_device_name(), cfg["hbm_peak_gbs"]) if device == "cuda" else None
    rows = []
    for dtype_name in cfg["dtypes"]:
        for dim in cfg["dims"]:
            tables, indices, offsets = _make(cfg, dim, dtype_name, device, cfg["seed"])
            n = cfg["batch"]
            provs = _providers(device, dtype_name)
            outs = {name: fn(tables, indices, offsets, n) for name, fn in provs.items()}
            ref = outs.get("torch-naive", outs["blsgpu-torch"]).float()
            tol = TOL.get(DTYPES[dtype_name], 1e-4)
            match = {
                name: bool(torch.allclose(o.float(), ref, rtol=tol, atol=tol)) for name, o in outs.items()
            }
            moved = _bytes_moved(tables, indices, offsets, outs["blsgpu-torch"])
            times = _measure(
                provs, (tables, indices, offsets, n), timer, cfg["warmup"], cfg["reps"], cfg["seed"]
            )
            base = times.get("torch-naive")
            for name, ts in times.items():
                med = statistics.median(ts)
                # Ratio within each rep, then the median: robust to a host whose load drifts.
                speedup = statistics.median(b / t for b, t in zip(base, ts, strict=True)) if base else None
                row = {
                    "provider": name, "dtype": dtype_name, "dim": dim, "time_s": med,
                    "time_p20_s": _quantile(ts, 0.2), "time_p80_s": _quantile(ts, 0.8),
                    "bytes": moved, "gbs": moved / med / 1e9,
                    "speedup": speedup, "match": match[name],
                    "nnz": indices.numel(),
                }  # fmt: skip
                if peak:
                    row["peak_fraction"] = row["gbs"] / peak
                rows.append(row)
                print(
                    f"{dtype_name:>5} D={dim:<4} {name:<18} {med * 1e3:9.3f} ms  "
                    f"{row['gbs']:8.2f} GB/s"
                    + (f"  {100 * row['peak_fraction']:5.1f}% peak" if peak else "")
                    + (f"  x{row['speedup']:.3f}" if row["speedup"] else "")
                    + ("" if row["match"] else "  MISMATCH"),
                    flush=True,
                )
            del tables, outs
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _records(cfg: dict, rows: list[dict], prov) -> list[Record]:
    config = {
        k: cfg[k]
        for k in (
            "device",
            "tables",
            "batch",
            "pooling",
            "rows",
            "reps",
            "warmup",
            "seed",
            "cpu_clock",
            "flush_mb",
        )
    }
    units = {"time_s": "s", "bytes": "B", "gbs": "GB/s", "peak_fraction": "ratio of HBM peak"}
    return [
        Record.from_row(
            NAME,
            r["provider"],
            {**config, "dtype": r["dtype"], "dim": r["dim"]},
            r,
            units,
            prov,
            ("speedup",) if r["speedup"] is not None else (),
            baseline="torch-naive",
            quantiles={"time_s": {"p20": r["time_p20_s"], "p50": r["time_s"], "p80": r["time_p80_s"]}},
        )
        for r in rows
    ]


def _summary(cfg: dict, rows: list[dict]) -> dict:
    summary = {"all_match": all(r["match"] for r in rows)}
    torch_rows = [r for r in rows if r["provider"] == "blsgpu-torch" and r["speedup"] is not None]
    if torch_rows:
        speedups = [r["speedup"] for r in torch_rows]
        summary["blsgpu_torch_speedup_min"] = min(speedups)
        summary["blsgpu_torch_speedup_median"] = statistics.median(speedups)
    target = [
        r for r in rows if r["provider"] == "blsgpu-triton" and r["dtype"] == "fp16" and r["dim"] == 128
    ]
    if target and cfg["pooling"] == 20:
        r = target[0]
        summary["gpu_target"] = {
            "peak_fraction": r.get("peak_fraction"), "speedup": r["speedup"],
            "met": (r.get("peak_fraction") or 0) >= TARGET_PEAK_FRACTION
            and (r["speedup"] or 0) >= TARGET_SPEEDUP,
        }  # fmt: skip
    return summary


def _plot(cfg: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bw, ax_sp) = plt.subplots(1, 2, figsize=(11, 4.2))
    providers = sorted({r["provider"] for r in rows})
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    styles = {"fp32": "-", "fp16": "--", "bf16": "-.", "int8": ":"}
    for provider in providers:
        for dtype in sorted({r["dtype"] for r in rows}):
            pts = sorted(
                (r["dim"], r["gbs"], r["speedup"])
                for r in rows
                if r["provider"] == provider and r["dtype"] == dtype
            )
            if not pts:
                continue
            kw = dict(
                color=colors[provider], ls=styles.get(dtype, "-"), marker="o", label=f"{provider} {dtype}"
            )
            xs = [p[0] for p in pts]
            ax_bw.plot(xs, [p[1] for p in pts], **kw)
            if provider != "torch-naive" and all(p[2] is not None for p in pts):
                ax_sp.plot(xs, [p[2] for p in pts], **kw)
    for ax in (ax_bw, ax_sp):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(cfg["dims"], [str(d) for d in cfg["dims"]])
        ax.set_xlabel("D")
        ax.legend(fontsize=7)
    ax_bw.set_ylabel("GB/s (bytes moved / time)")
    ax_sp.axhline(1.0, color="gray", lw=0.8)
    ax_sp.set_ylabel("speedup vs torch-naive (median of per-rep ratios)")
    fig.suptitle(
        f"pooled lookup on {cfg['device']}: T={cfg['tables']} N={cfg['batch']} "
        f"L={cfg['pooling']} rows={cfg['rows']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--dims", default="16,32,64,128")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16,int8")
    ap.add_argument("--tables", type=int, default=None, help="T (default 8 on CPU, 26 on GPU)")
    ap.add_argument("--batch", type=int, default=None, help="N (default 2048 on CPU, 8192 on GPU)")
    ap.add_argument("--pooling", type=int, default=20, help="mean pooling factor L")
    ap.add_argument("--rows", type=int, default=None, help="rows per table (1e5 CPU, 1e6 GPU)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--hbm-peak-gbs", type=float, default=None)
    ap.add_argument(
        "--flush-mb",
        type=int,
        default=None,
        help="MiB written before each timed call to evict caches (64 CPU, 256 GPU; 0: off)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    torch.set_num_threads(args.threads)
    cfg = {
        "device": args.device, "dims": [int(d) for d in args.dims.split(",")],
        "dtypes": (args.dtypes or ("fp16,fp32,int8" if gpu else "fp32,fp16,int8")).split(","),
        "tables": args.tables or (26 if gpu else 8), "batch": args.batch or (8192 if gpu else 2048),
        "pooling": args.pooling, "rows": args.rows or (1_000_000 if gpu else 100_000),
        "reps": args.reps, "warmup": args.warmup, "seed": args.seed,
        "cpu_clock": "thread" if args.threads == 1 else "wall", "hbm_peak_gbs": args.hbm_peak_gbs,
        "flush_mb": args.flush_mb if args.flush_mb is not None else (256 if gpu else 64),
    }  # fmt: skip
    t0 = time.perf_counter()
    rows = run(cfg)
    summary = _summary(cfg, rows)
    summary["wall_s"] = time.perf_counter() - t0
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(json.dumps({k: v for k, v in summary.items() if k != "command"}, default=str))

    prov = Provenance(_machine(args.device, args.threads), _provenance.commit())
    write_report(
        args.out,
        NAME,
        {**summary, "config": cfg, "machine": prov.machine, "commit": prov.commit},
        _records(cfg, rows, prov),
        rows,
        None if args.no_plot else lambda path: _plot(cfg, rows, path),
    )
    return 0 if summary["all_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
