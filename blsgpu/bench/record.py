"""One record schema for every benchmark: the perf scripts' JSON and ``blsgpu bench --json``.

A record is one measured row: what ran (benchmark, provider, config), where it ran (machine,
commit), what was measured (values, each with its unit; the spread of some of them) and how it
compares with the baseline measured in the same run (ratios, and which provider the baseline is).
A reader that knows this one shape can read any benchmark's records; each benchmark keeps its own
summary (targets met or not) and, where its plots need them, its raw rows beside the records.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from blsgpu import _provenance

__all__ = ["Provenance", "Record", "provenance", "write_json", "write_report"]


class Provenance(NamedTuple):
    """Where a run's numbers came from; taken once per run, shared by its records."""

    machine: dict
    commit: str


def provenance(**machine_extra) -> Provenance:
    """This machine (plus `machine_extra`, e.g. backend="gloo") and the checkout's commit."""
    return Provenance(_provenance.machine(**machine_extra), _provenance.commit())


@dataclass(frozen=True)
class Record:
    """One measured row.

    Attributes:
        benchmark: the script or command that measured it ("bench_exchange", "blsgpu_bench").
        provider: what ran, as the benchmark names its contenders ("sync", "bls", "torchrec-dmp").
        config: every setting that distinguishes this row (world size, bound, delay, ...).
        values: figure name -> {"value": number or None, "unit": "it/s" | "s" | "ms" | "B" | ...}.
        ratios: figure name -> this row against `baseline` in the same run (dimensionless).
        baseline: the provider the ratios compare with; None when the row has no ratios.
        quantiles: figure name -> its spread over repeats, in that figure's unit.
    """

    benchmark: str
    provider: str
    config: dict
    values: dict
    machine: dict
    commit: str
    ratios: dict = field(default_factory=dict)
    baseline: str | None = None
    quantiles: dict = field(default_factory=dict)

    @classmethod
    def from_row(
        cls,
        benchmark: str,
        provider: str,
        config: dict,
        row: dict,
        units: dict[str, str],
        prov: Provenance,
        ratios: tuple[str, ...] = (),
        baseline: str | None = None,
        quantiles: dict | None = None,
    ) -> Record:
        """The record of `row` (a benchmark's own result dict): `units` names the figures to
        take from it and their units, `ratios` the row's keys that are ratios to `baseline`.
        A figure the row lacks is left out, so one call fits rows of every provider."""
        return cls(
            benchmark=benchmark,
            provider=provider,
            config=config,
            values={k: {"value": row[k], "unit": u} for k, u in units.items() if k in row},
            ratios={k: row[k] for k in ratios if k in row},
            baseline=baseline if ratios else None,
            quantiles=quantiles or {},
            machine=prov.machine,
            commit=prov.commit,
        )


def _plain(x):
    """x with records as dicts, numpy scalars and arrays as Python, NaN / inf as null."""
    if isinstance(x, Record):
        return _plain(asdict(x))
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {(k if isinstance(k, str) else str(k)): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if type(x).__module__ == "numpy":
        return _plain(x.tolist() if hasattr(x, "tolist") else x.item())
    return x


def write_json(path, doc: dict) -> None:
    """Write a benchmark's document (records and whatever else it holds) as strict JSON."""
    Path(path).write_text(json.dumps(_plain(doc), indent=1, allow_nan=False) + "\n")


def write_report(out_dir, name: str, summary: dict, records: list[Record], rows: list, plot=None) -> Path:
    """A perf script's output: `out_dir/name.json` ({benchmark, summary, records, rows}) and, if
    `plot` is given, `out_dir/name.png` drawn by plot(path). The JSON goes first, so a failed plot
    never loses the numbers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_json(path, {"benchmark": name, "summary": summary, "records": records, "rows": rows})
    if plot is not None:
        plot(out / f"{name}.png")
    print(f"wrote {path}" + ("" if plot is None else f" and {name}.png"))
    return path
