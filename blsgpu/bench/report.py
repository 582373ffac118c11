"""What `blsgpu run/bench/simulate` print and draw: the results table, the plot, the simulation."""

from __future__ import annotations

import math

__all__ = ["format_simulation", "format_table", "plot"]


def _f(x, spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def format_table(doc: dict) -> str:
    """The final table of a run/bench: one line per run, then T_none / T_ideal and exactness."""
    c = doc["config"]
    m = doc["machine"]
    W, N, K = c["world_size"], c["batch"], c["iterations"]
    arch = c["arch"]
    lines = [
        f"blsgpu {c.get('command', 'bench')}: W={W} N={N} K={K} T={len(arch['embedding_sizes'])} "
        f"D={arch['bottom'][-1]} delay={c['delay']} seed={c['seed']} "
        f"({m['device']}, {m['backend']}, {m['cores']} cores)"
    ]
    head = (
        f"{'run':<5} {'B':>3} {'it/s':>8} {'samples/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'masking':>7} {'sim mask':>8} {'speedup':>7} {'sim it/s':>8} {'sim err':>7} "
        f"{'lag':>4} exact"
    )
    lines += [head, "-" * len(head)]
    for r in doc["runs"]:
        lines.append(
            f"{r['mode']:<5} {_f(r['bound'], 'd'):>3} {_f(r['throughput_it_s'], '.1f'):>8} "
            f"{_f(r['samples_per_s'], ',.0f'):>10} {_f(r['p50_ms'], '.2f'):>7} "
            f"{_f(r['p99_ms'], '.2f'):>7} {_f(r['masking'], '.3f'):>7} "
            f"{_f(r.get('predicted_masking'), '.3f'):>8} "
            f"{_f(r['speedup'], '.2f') + 'x':>7} {_f(r['simulated_throughput_it_s'], '.1f'):>8} "
            f"{_f(100 * r['sim_error'], '+.0f') + '%':>7} {_f(r['max_lag'], 'd'):>4} "
            f"{'yes' if r['exact'] else 'NO'}"
        )
    if W > m["cores"]:
        lines.append(
            f"OVERSUBSCRIBED: {W} ranks on {m['cores']} cores: a sleeping rank frees a core for the "
            "others, so measured masking can exceed 1; read the simulator's masking (sim mask)"
        )
    none = doc["none_run"]
    lines.append(
        f"T_none {doc['t_none_s']:.3f} s"
        + (f" ({none['throughput_it_s']:.1f} it/s without delays)" if none else "")
        + f", T_ideal {doc['t_ideal_s']:.3f} s ({K / doc['t_ideal_s']:.1f} it/s); "
        f"compute {doc['base_ms']:.2f} ms/it, exchange fit {1e3 * doc['comm_s']:.3f} ms/it"
    )
    lines.append(
        "exact: yes, predictions of sync and every bound identical bit for bit"
        if doc["exact"]
        else "exact: NO, some run's predictions differ from the synchronous run's"
    )
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    """PNG: throughput (measured, simulated, sync, ideal) and masking against the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = doc["config"]
    K = c["iterations"]
    bls = [r for r in doc["runs"] if r["mode"] == "bls"]
    sync = next(r for r in doc["runs"] if r["mode"] == "sync")
    xs = list(range(len(bls)))
    labels = [str(r["bound"]) for r in bls]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [r["throughput_it_s"] for r in bls], "o-", label="BLS measured")
    ax1.plot(
        xs, [r["simulated_throughput_it_s"] for r in bls], "x--", label="BLS simulated (replay of busy times)"
    )
    ax1.plot(xs, [r["predicted_throughput_it_s"] for r in bls], "+:", label="BLS predicted (delay model)")
    ax1.axhline(sync["throughput_it_s"], color="C3", label="synchronous")
    ax1.axhline(K / doc["t_ideal_s"], color="C2", ls=":", label="ideal (T_ideal)")
    ax1.set_xticks(xs, labels)
    ax1.set_xlabel("bound B")
    ax1.set_ylabel("iterations / s")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax1.set_title("throughput")
    ax2.plot(
        xs, [r["masking"] if r["masking"] is not None else math.nan for r in bls], "o-", label="measured"
    )
    ax2.plot(
        xs,
        [r["predicted_masking"] if r["predicted_masking"] is not None else math.nan for r in bls],
        "+:",
        color="C2",
        label="predicted (delay model)",
    )
    ax2.axhline(1.0, color="grey", ls=":")
    ax2.set_xticks(xs, labels)
    ax2.set_xlabel("bound B")
    ax2.set_ylabel("delay masking")
    ax2.set_title("masking = (T_sync - T_bls) / (T_sync - T_ideal)")
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"blsgpu DLRM inference: W={c['world_size']} N={c['batch']} K={K} "
        f"delay={c['delay']} ({doc['machine']['device']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_simulation(out: dict) -> str:
    """The replay of a record (when there is one), then one line per projection (W, B)."""
    lines = []
    if out["replay"]:
        r = out["replay"]
        lines.append(
            f"replay of the record's per-rank busy times: W={r['world_size']} "
            f"K={r['iterations']} exchange {1e3 * out['comm_s']:.3f} ms"
        )
        head = f"{'run':<5} {'B':>5} {'sim it/s':>9} {'measured':>9} {'error':>6} {'speedup':>8}"
        lines += [head, "-" * len(head)]
        for x in r["rows"]:
            lines.append(
                f"{x['mode']:<5} {_f(x['bound'], 'd'):>5} "
                f"{x['simulated_throughput_it_s']:>9.1f} "
                f"{_f(x['measured_throughput_it_s'], '.1f'):>9} "
                f"{_f(100 * x['error'], '+.0f') + '%':>6} "
                f"{_f(x['simulated_speedup'], '.2f') + 'x':>8}"
            )
        lines.append("")
    lines.append(
        f"projection: delay={out['delay']} K={out['iterations']} compute "
        f"{out['base_ms']:.3f} ms/it, exchange {1e3 * out['comm_s']:.3f} ms, "
        f"seed={out['seed']}"
    )
    head = f"{'W':>6} {'B':>5} {'sync it/s':>10} {'bls it/s':>10} {'speedup':>8} {'masking':>8}"
    lines += [head, "-" * len(head)]
    for p in out["projections"]:
        lines.append(
            f"{p['world_size']:>6} {p['bound']:>5} {p['sync_throughput_it_s']:>10.1f} "
            f"{p['bls_throughput_it_s']:>10.1f} {p['speedup']:>7.2f}x "
            f"{_f(p['masking'], '.3f'):>8}"
        )
    lines.append(f"({len(out['projections'])} projections in {out['elapsed_s']:.2f} s)")
    return "\n".join(lines)
