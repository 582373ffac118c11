"""Where a measurement came from: the commit and the machine, in every benchmark's JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def commit() -> str:
    """git rev-parse HEAD of the checkout blsgpu runs from ("-dirty" if modified), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty.strip() else "") if head else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra) -> dict:
    """Host, CPU, cores, Python and torch versions, the GPU when one is visible, plus `extra`."""
    out = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpus"] = torch.cuda.device_count()
    out.update(extra)
    return out


def write_report(out_dir, name: str, summary: dict, records: list, rows: list, plot=None) -> Path:
    """Write a benchmark's JSON ({summary, records, rows}) and, if `plot` is given, its PNG.

    plot(path) draws the figure; the JSON goes first so a failed plot never loses the numbers.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"summary": summary, "records": records, "rows": rows}, indent=1,
                               default=str))
    if plot is not None:
        plot(out / f"{name}.png")
    print(f"wrote {path}" + ("" if plot is None else f" and {name}.png"))
    return path
