"""The `blsgpu` command: bench end to end (table, progress bar, JSON, plot, trace), simulate, torchrun,
and clear errors for bad flags."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from blsgpu import cli
from blsgpu.bench.memory import RANK_BASE_BYTES, memory_estimate
from blsgpu.cli import types as cli_types

SMALL = [
    "--world-size",
    "2",
    "--iterations",
    "6",
    "--warmup",
    "1",
    "--batch",
    "8",
    "--tables",
    "2",
    "--rows",
    "40",
    "--arch-sparse-feature-size",
    "4",
    "--arch-mlp-top",
    "8-1",
    "--delay",
    "exp:2",
]
RUN_KEYS = {
    "mode",
    "bound",
    "throughput_it_s",
    "p50_ms",
    "p99_ms",
    "masking",
    "speedup",
    "exact",
    "simulated_throughput_it_s",
    "per_rank_iter_s",
    "transport",
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One small `blsgpu bench` with every output; (return code, stdout, stderr, paths)."""
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "b.json", "plot": out / "b.png", "trace": out / "trace"}
    argv = [
        "bench",
        *SMALL,
        "--bounds",
        "0,2",
        "--json",
        str(paths["json"]),
        "--plot",
        str(paths["plot"]),
        "--trace",
        str(paths["trace"]),
    ]
    env = dict(os.environ)
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "blsgpu", *argv], capture_output=True, text=True, timeout=240, env=env
    )
    return proc.returncode, proc.stdout, proc.stderr, paths


def test_bench_prints_the_table_and_progress(bench):
    rc, stdout, stderr, _ = bench
    assert rc == 0, stderr
    lines = stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("run "))
    for word in ("it/s", "samples/s", "p50 ms", "p99 ms", "masking", "speedup", "sim it/s", "exact"):
        assert word in lines[head]
    rows = [ln.split() for ln in lines[head + 2 : head + 5]]
    assert [r[:2] for r in rows] == [["sync", "-"], ["bls", "0"], ["bls", "2"]]
    assert all(r[-1] == "yes" for r in rows)
    assert "identical bit for bit" in stdout
    # tqdm's bar, on stderr: it reached every iteration of every run (none, sync, bls0, bls2).
    assert "24/24" in stderr and "it/s" in stderr


def test_bench_json_schema(bench):
    rc, _, stderr, paths = bench
    assert rc == 0, stderr
    doc = json.loads(paths["json"].read_text())
    for key in ("config", "commit", "machine", "t_ideal_s", "runs"):
        assert key in doc
    flags = {
        a.dest
        for a in cli.build_parser()._subparsers._group_actions[0].choices["bench"]._actions
        if a.dest != "help"
    }
    assert flags <= set(doc["config"]), flags - set(doc["config"])
    assert doc["config"]["world_size"] == 2 and doc["config"]["delay"] == "exp:2"
    assert doc["config"]["bounds"] == [0, 2]
    assert isinstance(doc["commit"], str) and doc["commit"]
    assert doc["machine"]["cores"] >= 1
    assert [(r["mode"], r["bound"]) for r in doc["runs"]] == [("sync", None), ("bls", 0), ("bls", 2)]
    for r in doc["runs"]:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["exact"] is True and r["transport"] == ["gloo"]
        assert len(r["per_rank_iter_s"]) == 2 and len(r["per_rank_iter_s"][0]) == 6


def test_bench_writes_plot_and_traces(bench):
    rc, _, stderr, paths = bench
    assert rc == 0, stderr
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in paths["trace"].iterdir()) == ["rank0.json", "rank1.json"]
    text = (paths["trace"] / "rank1.json").read_text()
    for name in (
        "blsgpu.run[sync:0]",
        "blsgpu.run[bls2:0]",
        "blsgpu.post[ebc_ids",
        "blsgpu.wait[ebc_pooled",
        "blsgpu.delay[dlrm",
    ):
        assert name in text, name


def test_simulate_replays_a_record(bench, capsys):
    _, _, _, paths = bench
    assert cli.main(["simulate", "--from-json", str(paths["json"]), "--world-size", "4,64"]) == 0
    out = capsys.readouterr().out
    assert "replay of the record's per-rank busy times: W=2 K=6" in out
    replay = out.split("projection:")[0]
    assert sum(ln.startswith(("sync", "bls")) for ln in replay.splitlines()) == 3
    assert "exp:2" in out


def test_simulate_4096_ranks_quickly(tmp_path):
    path = tmp_path / "sim.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "blsgpu",
            "simulate",
            "--delay",
            "rotate:10",
            "--world-size",
            "64,1024,4096",
            "--iterations",
            "200",
            "--bounds",
            "0,8",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60
    doc = json.loads(path.read_text())
    by = {(p["world_size"], p["bound"]): p for p in doc["projections"]}
    assert set(by) == {(w, b) for w in (64, 1024, 4096) for b in (0, 8)}
    # rotate: a synchronous run pays the delay every iteration; B=8 hides much of it.
    assert by[(64, 0)]["speedup"] == pytest.approx(1.0)
    assert by[(64, 8)]["speedup"] > 1.5
    assert "4096" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--bounds", "1,x"], "--bounds must be comma-separated integers"),
        (["bench", "--bounds", "2,2"], "repeated"),
        (["bench", "--delay", "bogus:1"], "unknown delay model 'bogus'"),
        (["bench", "--delay", "exp:-1"], "must be >= 0"),
        (["bench", "--delay", "straggler:7:5"], "straggler rank 7 is not < world size 4"),
        (["run", "--world-size", "0"], "--world-size must be >= 1"),
        (["run", "--iterations", "ten"], "--iterations must be an integer"),
        (
            ["bench", "--arch-mlp-bot", "13-64-32", "--arch-sparse-feature-size", "16"],
            "ends in 32 but --arch-sparse-feature-size is 16",
        ),
        (["bench", "--arch-mlp-bot", "12-16"], "must start with the 13 dense features"),
        (["bench", "--arch-mlp-top", "64-2"], "must end in 1"),
        (["bench", "--tables", "3", "--arch-embedding-size", "10-10"], "lists 2 tables"),
        (["run", "--device", "cuda"], "under torchrun"),
        (["run", "--device", "tpu"], "invalid choice"),
        (["simulate", "--world-size", "0"], "--world-size must lie in"),
        (["simulate", "--from-json", "/nonexistent/x.json"], "--from-json"),
        (["run", "--bound", "5000"], "--bound must be <= 4096"),
        (["run", "--json", "/tmp"], "cannot write /tmp: it is a folder"),
        (["bench", "--plot", "/nonexistent/p.png"], "its folder does not exist"),
        (["simulate", "--json", "/tmp"], "cannot write /tmp: it is a folder"),
        (["simulate", "--json", "/nonexistent/s.json"], "its folder does not exist"),
        ([], "required"),
        # Outputs are created and removed up front: a folder that exists but takes no file.
        (["bench", "--json", "/proc/blsgpu.json"], "cannot write /proc/blsgpu.json (--json)"),
        (["run", "--plot", "/proc/blsgpu.png"], "cannot write /proc/blsgpu.png (--plot)"),
        (["bench", "--trace", "/proc/blsgpu-trace"], "cannot write into /proc/blsgpu-trace"),
        (["simulate", "--json", "/proc/blsgpu.json"], "cannot write /proc/blsgpu.json (--json)"),
        (["bench", "--json", ""], "--json needs a path, got ''"),
        (["run", "--plot", " "], "--plot needs a path"),
        (["bench", "--trace", ""], "--trace needs a folder"),
        (["simulate", "--json", ""], "--json needs a path, got ''"),
        (["simulate", "--from-json", ""], "--from-json needs a path"),
        # Delays: none longer than a peer may wait, none the world cannot sit out.
        (["bench", "--delay", "straggler:1:1e16"], "more than 300000 ms"),
        (["bench", "--delay", "exp:1e9"], "more than 300000 ms"),
        (["simulate", "--delay", "rotate:1e7"], "more than 300000 ms"),
        (["bench", "--delay", "exp:100000"], "its peers would give up on it while it sleeps"),
        (["run", "--delay", "straggler:1:2000", "--timeout-s", "3"], "would give up on it"),
        (["run", "--delay", "straggler:1:100", "--timeout-s", "10"], "the world would time out"),
        # Sizes: hard bounds, then the memory the configuration needs against what there is.
        (["run", "--rows", "2147483649"], "--rows must be <= 2147483648"),
        (["run", "--arch-embedding-size", "10-3000000000"], "at most 2147483648 rows per table"),
        (["run", "--seed", str(2**64)], "--seed must be <= 4294967295"),
        (["run", "--timeout-s", "99999999999"], "--timeout-s must be <= 1000000000"),
        (["run", "--world-size", "5000"], "--world-size must be <= 1024"),
        (["run", "--iterations", "10000000000"], "--iterations must be <= 1000000000"),
        (["simulate", "--base-ms", "1e300"], "--base-ms must be <= 1e+09"),
        (["run", "--rows", "2147483648", "--tables", "64"], "of memory on this machine"),
        (["bench", "--batch", "1000000000"], "for the batches in flight"),
        (["run", "--pooling", "1e12"], "for the batches in flight"),
        (["run", "--iterations", "999999999", "--batch", "1000"], "predictions, timings"),
        (["run", "--arch-mlp-top", "1000000-1000000-1"], "for the dense MLPs"),
        (["simulate", "--world-size", "65536", "--iterations", "999999999"], "of memory"),
    ],
)
def test_bad_flags_give_clear_errors(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_run_under_torchrun_gathers_once(tmp_path):
    path = tmp_path / "tr.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "blsgpu",
            "run",
            *SMALL[2:],
            "--bound",
            "2",
            "--no-progress",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints the table.
    assert proc.stdout.count("identical bit for bit") == 1
    doc = json.loads(path.read_text())
    assert doc["config"]["world_size"] == 2
    assert [(r["mode"], r["bound"]) for r in doc["runs"]] == [("sync", None), ("bls", 2)]
    assert all(r["exact"] for r in doc["runs"])


def test_output_checks_leave_nothing_behind(tmp_path):
    parser = cli.build_parser()
    new = tmp_path / "new.json"
    cli_types.check_out_paths(parser, ("--json", str(new)))
    assert not new.exists()
    old = tmp_path / "old.json"
    old.write_text("keep me")
    cli_types.check_out_paths(parser, ("--json", str(old)))
    assert old.read_text() == "keep me"
    cli_types.check_out_dir(parser, "--trace", str(tmp_path / "a" / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    (tmp_path / "t").mkdir()
    cli_types.check_out_dir(parser, "--trace", str(tmp_path / "t"))
    assert list((tmp_path / "t").iterdir()) == []


def test_memory_estimate_of_the_defaults_is_modest():
    parser = cli.build_parser()
    args = parser.parse_args(["bench"])
    need, parts = memory_estimate(cli._config(args, parser, 4), 4, launcher=True)
    assert 5 * RANK_BASE_BYTES < need < 5 * RANK_BASE_BYTES + (200 << 20)  # ranks, launcher


def test_under_torchrun_every_rank_refuses_an_empty_output_path(capsys, monkeypatch):
    # Only rank 0 writes --json, but a rank that let it pass would wait for rank 0 in vain.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--json", ""])
    assert e.value.code == 2
    assert "--json needs a path" in capsys.readouterr().err


def test_bench_flags_oversubscribed_runs_and_shows_the_simulated_masking(bench):
    # Ranks outnumbering cores: a sleeping rank frees a core, measured masking can exceed 1, so
    # the JSON says so and the table says to read the simulator's masking, printed beside it.
    from blsgpu.bench.report import format_table

    rc, _, stderr, paths = bench
    assert rc == 0, stderr
    doc = json.loads(paths["json"].read_text())
    assert doc["oversubscribed"] == (doc["config"]["world_size"] > doc["machine"]["cores"])
    assert all("predicted_masking" in r for r in doc["runs"])
    doc["machine"]["cores"] = 1
    table = format_table(doc)
    assert "sim mask" in table.splitlines()[1]
    assert "OVERSUBSCRIBED: 2 ranks on 1 cores" in table and "read the simulator's masking" in table
    doc["machine"]["cores"] = 2
    assert "OVERSUBSCRIBED" not in format_table(doc)
