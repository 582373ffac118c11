"""pooled_lookup and QuantizedTable: both backends against per-table F.embedding_bag (in fp64).

The Triton backend runs under TRITON_INTERPRET=1 on CPU tensors. Triton reads that variable when a
kernel is decorated, i.e. when blsgpu.kernels.embedding_bag is first imported, so setting it here would
leak into every later test module of the same pytest process. Instead one child process (this file run
as a script, with the variable set in its environment only) runs every case with backend="triton" and
hands back the results; the tests below compare them. Cases are built from small specs with seeded
generators, so parent and child build identical inputs without shipping tensors.

Interpreter coverage: fp32, fp16 and bf16 tables (bf16 loads, casts and stores all work under the
Triton 3.7 interpreter), int8 row-wise tables (both the aligned and the byte-wise qparam loads), and
fp32/fp16/bf16 outputs.

Tolerances (rtol, atol) per dtype, against an fp64 reference, for pooling factors up to 100:
fp32 (1e-5, 1e-4); fp16 (2e-3, 2e-2); bf16 (1.6e-2, 1.5e-1). A case uses the coarsest of its tables'
dtypes (int8 row-wise counts as fp32: the reference pools its dequantized rows), its output dtype, and
the dtype its weights are applied in (the torch path applies per-sample weights in the table dtype).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

import blsgpu
from blsgpu.lookup import QuantizedTable, column_offsets, pooled_lookup

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-2), torch.bfloat16: (1.6e-2, 1.5e-1)}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SENTINEL = 7.0  # fills a send buffer around an `out` view: must survive untouched

# --------------------------------------------------------------------------------------------------
# Case specs: tables as (kind, rows, D); N bags per table; pooling factors in [0, max_l].

CASES = {
    "fp32_dims_sum": dict(tables=[("fp32", 40, d) for d in (1, 24, 64, 100, 128)], n=5, max_l=12),
    "fp32_dims_mean_i32": dict(
        tables=[("fp32", 40, d) for d in (1, 24, 100)], n=4, max_l=9, pooling="mean", idx="int32", off="int32"
    ),
    "fp32_psw_l100": dict(
        tables=[("fp32", 300, 64), ("fp32", 50, 24)], n=3, max_l=100, psw=True, idx="int32"
    ),
    "fp16_out_fp16": dict(
        tables=[("fp16", 60, 24), ("fp16", 60, 100)], n=4, max_l=30, out_dtype="fp16", off="int32"
    ),
    "fp16_mean_out_fp32": dict(tables=[("fp16", 200, 128)], n=3, max_l=100, pooling="mean", out_dtype="fp32"),
    "fp16_psw_out_bf16": dict(
        tables=[("fp16", 30, 64), ("fp16", 30, 1)], n=4, max_l=10, psw=True, out_dtype="bf16"
    ),
    "fp32_psw_mean_fbgemm": dict(
        tables=[("fp32", 80, 24), ("fp32", 80, 100)], n=4, max_l=100, psw=True, pooling="mean"
    ),
    "fp16_psw_mean_out_fp32": dict(
        tables=[("fp16", 40, 64)], n=4, max_l=20, psw=True, pooling="mean", out_dtype="fp32", idx="int32"
    ),
    "int8_psw_mean_out_fp16": dict(
        tables=[("int8", 40, 1), ("int8", 40, 64)], n=4, max_l=12, psw=True, pooling="mean", out_dtype="fp16"
    ),
    "bf16_sum": dict(tables=[("bf16", 50, 64), ("bf16", 50, 128)], n=4, max_l=20),
    "bf16_psw_out_fp32": dict(
        tables=[("bf16", 50, 24)], n=5, max_l=16, psw=True, out_dtype="fp32", idx="int32"
    ),
    "int8_dims_sum": dict(tables=[("int8", 40, d) for d in (1, 24, 64, 100)], n=4, max_l=12),
    "int8_mean_out_fp16": dict(
        tables=[("int8", 120, 128), ("int8", 30, 3)],
        n=3,
        max_l=100,
        pooling="mean",
        out_dtype="fp16",
        idx="int32",
        off="int32",
    ),
    "int8_psw_out_bf16": dict(
        tables=[("int8", 50, 24), ("int8", 50, 100)], n=4, max_l=10, psw=True, out_dtype="bf16"
    ),
    "mixed_into_send_buffer": dict(
        tables=[("fp32", 30, 24), ("int8", 30, 64), ("fp16", 30, 1), ("bf16", 30, 100)],
        n=4,
        max_l=8,
        out_dtype="fp16",
        out_view=(3, 40, 5),
    ),
    "mean_into_send_buffer_i32": dict(
        tables=[("fp32", 30, 100), ("fp32", 30, 64)],
        n=3,
        max_l=7,
        pooling="mean",
        out_view=(2, 7, 3),
        idx="int32",
        off="int32",
    ),
    "many_tables_one_group": dict(tables=[("fp32", 20, 24)] * 6, n=3, max_l=5, psw=True),
    "strided_rows_shared_storage": dict(
        tables=[("fp32", 25, 24), ("fp32", 25, 24), ("int8", 25, 24)], n=4, max_l=6, shared_storage=True
    ),
    "all_bags_empty": dict(tables=[("fp32", 10, 24), ("int8", 10, 64)], n=3, max_l=0),
    "zero_batch": dict(tables=[("fp32", 10, 24), ("fp16", 10, 8)], n=0, max_l=4),
    "one_bag_l100": dict(tables=[("fp16", 500, 128)], n=1, max_l=100, exact_l=True),
}


def _gen(seed_text: str) -> torch.Generator:
    return torch.Generator().manual_seed(sum(map(ord, seed_text)) * 7919)


def build_case(name: str, spec: dict) -> dict:
    """pooled_lookup kwargs (and the send buffer around `out`, if any) for a spec."""
    g = _gen(name)
    tables = []
    shared = spec.get("shared_storage", False)
    storage = torch.randn(4096, generator=g) if shared else None
    cursor = 0
    for kind, rows, d in spec["tables"]:
        w = torch.randn(rows, d, generator=g)
        if kind == "int8":
            table = QuantizedTable.from_float(w)
            if shared:  # rows of D + 8 bytes inside a wider byte buffer
                buf = torch.zeros(rows, d + 8 + 5, dtype=torch.uint8)
                buf[:, : d + 8] = table.data
                table = QuantizedTable(buf[:, : d + 8])
        else:
            table = w.to(_DTYPES[kind])
            if shared:  # a view with row stride D + 3 into one storage shared by the tables
                view = storage[cursor : cursor + rows * (d + 3)].view(rows, d + 3)[:, :d]
                view.copy_(table)
                cursor += rows * (d + 3)
                table = view
        tables.append(table)
    t_count, n, max_l = len(tables), spec["n"], spec["max_l"]
    lengths = torch.randint(0, max_l + 1, (t_count * n,), generator=g)
    if max_l > 0 and t_count * n > 2:
        lengths[::5] = 0  # empty bags
        lengths[1] = max_l  # the largest pooling factor always occurs
    if spec.get("exact_l"):
        lengths[:] = max_l
    offsets = torch.zeros(t_count * n + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    ids = []
    for t, (_, rows, _) in enumerate(spec["tables"]):
        count = int(lengths[t * n : (t + 1) * n].sum())
        ids.append(torch.randint(0, rows, (count,), generator=g))
    indices = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    kwargs = dict(
        tables=tables,
        indices=indices.to(getattr(torch, spec.get("idx", "int64"))),
        offsets=offsets.to(getattr(torch, spec.get("off", "int64"))),
        pooling=spec.get("pooling", "sum"),
    )
    if spec.get("psw"):
        kwargs["per_sample_weights"] = torch.rand(indices.numel(), generator=g) * 2 - 0.5
    if "out_dtype" in spec:
        kwargs["out_dtype"] = _DTYPES[spec["out_dtype"]]
    buffer = None
    if "out_view" in spec:
        # out = rows [r0, r0 + N) and columns [c0, c0 + sum(D)) of a wider send buffer.
        r0, extra_cols, c0 = spec["out_view"]
        width = column_offsets(tables)[-1]
        dtype = kwargs.get("out_dtype", torch.float32)
        buffer = torch.full((n + r0 + 2, width + extra_cols), SENTINEL, dtype=dtype)
        kwargs["out"] = buffer[r0 : r0 + n, c0 : c0 + width]
    return dict(kwargs=kwargs, buffer=buffer)


def reference(kwargs: dict) -> torch.Tensor:
    """fp64 per-table F.embedding_bag, concatenated along columns."""
    tables, indices, offsets = kwargs["tables"], kwargs["indices"].long(), kwargs["offsets"].long()
    psw = kwargs.get("per_sample_weights")
    n = (offsets.numel() - 1) // len(tables)
    # A weighted mean is sum(w * row) / (ids in the bag), as FBGEMM's TBE; F.embedding_bag refuses
    # weights with "mean", so the reference sums and divides.
    weighted_mean = psw is not None and kwargs["pooling"] == "mean"
    outs = []
    for t, table in enumerate(tables):
        w = table.dequantize() if isinstance(table, QuantizedTable) else table
        a, b = int(offsets[t * n]), int(offsets[(t + 1) * n])
        offs = offsets[t * n : (t + 1) * n + 1] - a
        pooled = F.embedding_bag(
            indices[a:b],
            w.double(),
            offs,
            mode="sum" if weighted_mean else kwargs["pooling"],
            include_last_offset=True,
            per_sample_weights=None if psw is None else psw[a:b].double(),
        )
        if weighted_mean:
            pooled = pooled / (offs[1:] - offs[:-1]).clamp(min=1).double()[:, None]
        outs.append(pooled)
    return torch.cat(outs, dim=1)


def tolerance(kwargs: dict, out_dtype: torch.dtype) -> tuple[float, float]:
    dtypes = [out_dtype] + [
        torch.float32 if isinstance(t, QuantizedTable) else t.dtype for t in kwargs["tables"]
    ]
    return max((TOL[d] for d in dtypes), key=lambda tol: tol[0])


# --------------------------------------------------------------------------------------------------
# Bad inputs: each must raise ValueError (message pattern given) on both backends.


def _ok(name: str = "fp32_dims_sum") -> dict:
    return build_case(name, CASES[name])["kwargs"]


def _bad_id(value: int, name: str, table: int = 1) -> dict:
    """The case with the first id of `table` replaced by `value`."""
    kw = _ok(name)
    n = (kw["offsets"].numel() - 1) // len(kw["tables"])
    first, end = int(kw["offsets"][table * n]), int(kw["offsets"][(table + 1) * n])
    assert end > first, "the table needs ids"
    kw["indices"] = kw["indices"].clone()
    kw["indices"][first] = value
    return kw


def _with(name: str = "fp32_dims_sum", **changes) -> dict:
    kw = _ok(name)
    for key, fn in changes.items():
        kw[key] = fn(kw)
    return kw


def _offsets(fn):
    def change(kw):
        off = kw["offsets"].clone()
        fn(off)
        return off

    return change


def _out(*shape, dtype=torch.float32):
    return lambda kw: torch.empty(*shape, dtype=dtype)


def _set_offset(i, value_fn):
    return _offsets(lambda o: o.__setitem__(i, value_fn(o)))


ERROR_CASES = {
    "id_too_large": (
        lambda: _bad_id(40, "fp32_dims_sum"),
        r"indices\[\d+\] = 40 is out of range for table 1 with 40 rows",
    ),
    "id_negative": (lambda: _bad_id(-1, "fp32_dims_sum"), r"= -1 is out of range for table 1"),
    "id_too_large_fp16_psw": (
        lambda: _bad_id(30, "fp16_psw_out_bf16", 0),
        r"= 30 is out of range for table 0",
    ),
    "id_too_large_bf16": (lambda: _bad_id(50, "bf16_sum"), r"= 50 is out of range for table 1"),
    "id_too_large_fp16_weighted_mean": (
        lambda: _bad_id(40, "fp16_psw_mean_out_fp32", 0),
        r"= 40 is out of range for table 0",
    ),
    "id_too_large_int8": (lambda: _bad_id(40, "int8_dims_sum", 2), r"= 40 is out of range for table 2"),
    "id_negative_int8_mean_i32": (
        lambda: _bad_id(-5, "int8_mean_out_fp16", 0),
        r"= -5 is out of range for table 0",
    ),
    "offsets_decreasing": (
        lambda: _with(offsets=_set_offset(3, lambda o: o[4] + 1)),
        r"non-decreasing: offsets\[3\]",
    ),
    "offsets_bad_end": (
        lambda: _with(offsets=_set_offset(-1, lambda o: o[-1] - 1)),
        r"must end at len\(indices\)",
    ),
    "offsets_bad_start": (lambda: _with(offsets=_set_offset(0, lambda o: 1)), r"must start at 0"),
    "offsets_wrong_length": (
        lambda: _with(offsets=lambda kw: kw["offsets"][:-1]),
        r"T\*N \+ 1 entries for T=5 tables; got 25",
    ),
    "offsets_length_vs_out": (lambda: _with(out=_out(4, 317)), r"T\*N \+ 1 = 21 entries"),
    "weights_wrong_length": (
        lambda: _with("fp32_psw_l100", per_sample_weights=lambda kw: kw["per_sample_weights"][1:]),
        r"per_sample_weights has \d+ weights for \d+ indices",
    ),
    "out_wrong_shape": (
        lambda: _with(out=_out(5, 316)),
        r"out must have shape \[N, sum\(D_t\)\] = \[5, 317\]",
    ),
    "out_wrong_dtype": (
        lambda: _with(out=_out(5, 317, dtype=torch.float16), out_dtype=lambda kw: torch.float32),
        r"out has dtype torch.float16",
    ),
    "out_column_stride": (lambda: _with(out=lambda kw: torch.empty(317, 5).t()), r"unit column stride"),
    "out_rows_overlap": (
        lambda: _with(out=lambda kw: torch.empty(5 * 317 + 64).as_strided((5, 317), (64, 1))),
        r"out rows overlap \(row stride 64 < width 317\)",
    ),
    "out_dtype_int": (lambda: _with(out_dtype=lambda kw: torch.int32), r"out_dtype must be"),
    "table_int_dtype": (
        lambda: _with(tables=lambda kw: [kw["tables"][0].int(), *kw["tables"][1:]]),
        r"table 0 has dtype torch.int32",
    ),
    "indices_float": (
        lambda: _with(indices=lambda kw: kw["indices"].float()),
        r"indices must be 1-D int32 or int64",
    ),
    "pooling_max": (lambda: _with(pooling=lambda kw: "max"), r"pooling must be 'sum' or 'mean'"),
}


# --------------------------------------------------------------------------------------------------
# The interpreter child: python tests/test_lookup.py --interpret-worker RESULT_PATH


def _big_stride_case() -> dict:
    """Rows and output rows past 2^31 elements, in virtual memory that is never touched.

    Table 1 is int8 row-wise with a row stride of 2^31 + 64 bytes, so id 1 starts past 2^31; `out` is
    fp16 with a row stride of 2^30 + 32 elements, so bag 2 lands past 2^31. A 32-bit product would
    wrap. Table 0 is small and comes first: the kernel addresses the group relative to it, so the
    interpreter only copies that small tensor, not the 2 GiB one.
    """
    d = 16
    g = _gen("big")
    small = QuantizedTable.from_float(torch.randn(4, d, generator=g))
    stride = 2**31 + 64
    raw = torch.empty(2 * stride, dtype=torch.uint8)
    rows = raw.as_strided((2, d + 8), (stride, 1))
    rows.copy_(QuantizedTable.from_float(torch.randn(2, d, generator=g)).data)
    big = QuantizedTable(rows)
    out_stride = 2**30 + 32
    out = torch.empty(2 * out_stride + 2 * d, dtype=torch.float16).as_strided((3, 2 * d), (out_stride, 1))
    return dict(
        tables=[small, big],
        indices=torch.tensor([0, 1, 3, 1, 0, 1, 1]),
        offsets=torch.tensor([0, 1, 2, 3, 4, 6, 7]),
        out=out,
    )


def _masked_bad_ids_case() -> dict:
    """validate=False with ids outside the table: the kernel must skip them, not read them."""
    kw = _ok("fp32_psw_l100")
    indices = kw["indices"].clone()
    indices[0], indices[5] = 10**9, -(10**6)
    return dict(kw, indices=indices, validate=False)


def _masked_bad_offsets_case() -> dict:
    """validate=False with offsets past the ids and below 0: clamped, never read outside the ids."""
    kw = _ok("fp32_dims_sum")
    offsets = kw["offsets"].clone()
    offsets[3] = -5  # bag 2 ends below 0, bag 3 starts below 0 (both in table 0)
    offsets[-1] += 10**9  # the last bag ends far past the ids
    return dict(kw, offsets=offsets, validate=False)


def _worker(result_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from blsgpu.kernels.embedding_bag import interpreting

    assert interpreting(), "TRITON_INTERPRET=1 did not reach Triton"
    results = {}

    def attempt(key, fn):
        # A failing case is reported by its own test, not by the whole worker.
        try:
            results[key] = fn()
        except Exception as e:
            results[key] = (_WORKER_ERROR, f"{type(e).__name__}: {e}")

    def run_case(name, spec):
        case = build_case(name, spec)
        out = pooled_lookup(**case["kwargs"], backend="triton")
        return case["buffer"] if case["buffer"] is not None else out

    def run_error_case(make):
        try:
            pooled_lookup(**make(), backend="triton")
        except Exception as e:  # the parent asserts the type
            return (type(e).__name__, str(e))
        return ("no error", "")

    for name, spec in CASES.items():
        attempt(name, lambda name=name, spec=spec: run_case(name, spec))
    for name, (make, _) in ERROR_CASES.items():
        attempt("error:" + name, lambda make=make: run_error_case(make))
    attempt("big_stride", lambda: pooled_lookup(**_big_stride_case(), backend="triton").clone())
    attempt("masked_bad_ids", lambda: pooled_lookup(**_masked_bad_ids_case(), backend="triton"))
    attempt("masked_bad_offsets", lambda: pooled_lookup(**_masked_bad_offsets_case(), backend="triton"))
    torch.save(results, result_path)


_WORKER_ERROR = "worker raised"  # marks a case whose run raised in the worker (plain data pickles)


def _result(results: dict, key: str):
    value = results[key]
    if isinstance(value, tuple) and len(value) == 2 and value[0] == _WORKER_ERROR:
        pytest.fail(f"Triton (interpreted) raised for {key}: {value[1]}")
    return value


@pytest.fixture(scope="module")
def interpreted():
    """Results of every case run by the Triton kernel under TRITON_INTERPRET=1 (one child)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.pt")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--interpret-worker", path],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if proc.returncode != 0:
            pytest.fail(f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return torch.load(path, weights_only=False)


def _run(backend: str, name: str, interpreted_results) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    case = build_case(name, CASES[name])
    if backend == "torch":
        out = pooled_lookup(**case["kwargs"], backend="torch")
        result = case["buffer"] if case["buffer"] is not None else out
    else:
        result = _result(interpreted_results, name)
    return result, case["kwargs"], case["buffer"]


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        return "triton", request.getfixturevalue("interpreted")
    return "torch", None


# --------------------------------------------------------------------------------------------------
# One semantics: both backends match the reference.


@pytest.mark.parametrize("name", list(CASES))
def test_matches_embedding_bag_reference(name, backend):
    which, results = backend
    result, kwargs, buffer = _run(which, name, results)
    spec = CASES[name]
    width = column_offsets(kwargs["tables"])[-1]
    n = spec["n"]
    expected = reference(kwargs)
    if buffer is not None:
        r0, _, c0 = spec["out_view"]
        got = result[r0 : r0 + n, c0 : c0 + width]
        outside = result.clone()
        outside[r0 : r0 + n, c0 : c0 + width] = SENTINEL
        assert bool((outside == SENTINEL).all()), "lookup wrote outside its out view"
    else:
        got = result
    out_dtype = _DTYPES.get(spec.get("out_dtype"))
    if out_dtype is None:
        out_dtype = got.dtype
    assert got.dtype == out_dtype
    assert tuple(got.shape) == (n, width)
    rtol, atol = tolerance(kwargs, out_dtype)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)


def test_default_out_dtype_promotes_tables():
    kw = build_case("mixed_into_send_buffer", CASES["mixed_into_send_buffer"])["kwargs"]
    del kw["out"], kw["out_dtype"]
    assert pooled_lookup(**kw).dtype == torch.float32  # fp32 + int8 + fp16 + bf16
    kw16 = _ok("fp16_out_fp16")
    del kw16["out_dtype"]
    assert pooled_lookup(**kw16).dtype == torch.float16


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_raises_value_error(name, backend):
    which, results = backend
    make, pattern = ERROR_CASES[name]
    if which == "torch":
        with pytest.raises(ValueError, match=pattern):
            pooled_lookup(**make(), backend="torch")
    else:
        kind, message = _result(results, "error:" + name)
        assert kind == "ValueError", (kind, message)
        assert re.search(pattern, message), message


def test_int64_addressing_past_2_31(backend):
    """Row offsets and output rows beyond 2^31 elements are addressed exactly."""
    which, results = backend
    case = _big_stride_case()
    got = (
        pooled_lookup(**case, backend="torch").clone() if which == "torch" else _result(results, "big_stride")
    )
    d = 16
    small, big = (t.dequantize().double() for t in case["tables"])
    # Bags: table 0 -> [0], [1], [3]; table 1 -> [1], [0, 1], [1].
    expected_small = small[[0, 1, 3]]
    expected_big = torch.stack([big[1], big[0] + big[1], big[1]])
    torch.testing.assert_close(got[:, :d].double(), expected_small, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[:, d:].double(), expected_big, rtol=2e-3, atol=2e-3)


def test_unvalidated_bad_ids_never_read(interpreted):
    """validate=False: the kernel masks ids outside the table (they pool as zeros), reads nothing."""
    kw = _masked_bad_ids_case()
    expected_kw = dict(kw)
    # The same bags with the two bad ids' weights zeroed stand for "skipped".
    psw = kw["per_sample_weights"].clone()
    psw[0] = psw[5] = 0.0
    indices = kw["indices"].clone()
    indices[0] = indices[5] = 0
    expected_kw.update(indices=indices, per_sample_weights=psw)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(
        _result(interpreted, "masked_bad_ids").double(), reference(expected_kw), rtol=rtol, atol=atol
    )


def test_unvalidated_bad_offsets_stay_inside_the_ids(interpreted):
    """validate=False: offsets outside [0, len(indices)] are clamped by the kernel."""
    got = _result(interpreted, "masked_bad_offsets").double()
    expected = reference(_ok("fp32_dims_sum"))
    assert bool(torch.isfinite(got).all())
    d0 = CASES["fp32_dims_sum"]["tables"][0][2]
    got[2:4, :d0] = expected[2:4, :d0]  # the two bags whose bounds were broken
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_unvalidated_bad_ids_raise_in_torch_path():
    kw = _masked_bad_ids_case()
    with pytest.raises((RuntimeError, IndexError)):
        pooled_lookup(**kw, backend="torch")


# --------------------------------------------------------------------------------------------------
# QuantizedTable


def test_quantized_table_is_fbgemm_fused_8bit():
    g = _gen("quant")
    w = torch.randn(64, 24, generator=g) * 3
    w[5] = 0.25  # a constant row: scale 0, every code 0, dequantizes exactly
    q = QuantizedTable.from_float(w)
    assert q.data.dtype == torch.uint8 and tuple(q.data.shape) == (64, 32)
    assert q.shape == (64, 24) and q.num_embeddings == 64 and q.embedding_dim == 24
    assert q.nbytes == 64 * (24 + 8)
    prepack = getattr(torch.ops.quantized, "embedding_bag_byte_prepack", None)
    if prepack is not None:
        assert torch.equal(q.data, prepack(w)), "layout or rounding differs from FBGEMM's"
    deq = q.dequantize()
    assert torch.equal(deq[5], w[5])
    # Rounding to the nearest code: error at most half a step per row.
    assert bool(((deq - w).abs() <= q.scale[:, None] / 2 + 1e-6).all())
    torch.testing.assert_close(q.scale, (w.amax(1) - w.amin(1)) / 255)
    torch.testing.assert_close(q.bias, w.amin(1))
    assert torch.equal(q.dequantize(torch.float16), deq.half())


def test_quantized_table_rejects_bad_data():
    with pytest.raises(ValueError, match="uint8"):
        QuantizedTable(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="D \\+ 8"):
        QuantizedTable(torch.zeros(4, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        QuantizedTable.from_float(torch.zeros(4, 4, dtype=torch.int64))


def test_quantized_table_with_odd_width_one_row_at_a_time(monkeypatch):
    """D % 4 != 0: a one-row slice keeps a storage offset a float32 view of its qparams refuses."""
    import blsgpu.lookup.torch_path as lookup

    w = torch.randn(3, 5, generator=_gen("odd"))
    q = QuantizedTable.from_float(w)
    one = QuantizedTable.from_float(w[1:2])
    torch.testing.assert_close(one.dequantize(), q.dequantize()[1:2])
    torch.testing.assert_close(one.scale, q.scale[1:2])
    fused = pooled_lookup([q], torch.tensor([1]), torch.tensor([0, 1]), backend="torch")
    monkeypatch.setattr(lookup, "_QUANTIZED_BAG", None)  # the gather + dequantize path (CUDA's)
    generic = pooled_lookup([q], torch.tensor([1]), torch.tensor([0, 1]), backend="torch")
    torch.testing.assert_close(generic, fused)
    torch.testing.assert_close(generic, q.dequantize()[1:2])


def test_quantized_generic_path_matches_fbgemm_kernel(monkeypatch):
    """The gather + dequantize path (used on CUDA) agrees with FBGEMM's CPU kernel."""
    import blsgpu.lookup.torch_path as lookup

    for name in ("int8_dims_sum", "int8_mean_out_fp16", "int8_psw_out_bf16", "int8_psw_mean_out_fp16"):
        kw = build_case(name, CASES[name])["kwargs"]
        kw["out_dtype"] = torch.float32
        fused = pooled_lookup(**kw, backend="torch")
        monkeypatch.setattr(lookup, "_QUANTIZED_BAG", None)
        generic = pooled_lookup(**kw, backend="torch")
        with pytest.raises(ValueError, match="= 40 is out of range for table 2"):
            pooled_lookup(**_bad_id(40, "int8_dims_sum", 2), backend="torch")
        monkeypatch.undo()
        torch.testing.assert_close(generic, fused, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# API details


def test_column_offsets_and_lazy_export():
    tables = [torch.zeros(3, 4), QuantizedTable.from_float(torch.zeros(2, 6)), torch.zeros(1, 1)]
    assert column_offsets(tables) == [0, 4, 10, 11]
    assert column_offsets([4, 6, 1]) == [0, 4, 10, 11]
    assert blsgpu.pooled_lookup is pooled_lookup
    assert blsgpu.QuantizedTable is QuantizedTable


def test_out_is_filled_and_returned():
    kw = _ok("fp32_dims_sum")
    out = torch.full((5, 317), SENTINEL)
    assert pooled_lookup(**kw, out=out) is out
    torch.testing.assert_close(out.double(), reference(kw), rtol=1e-5, atol=1e-4)


def test_backend_choice():
    from blsgpu.kernels.embedding_bag import interpreting

    kw = _ok("fp32_dims_sum")
    torch.testing.assert_close(pooled_lookup(**kw), pooled_lookup(**kw, backend="torch"))
    with pytest.raises(ValueError, match="backend must be"):
        pooled_lookup(**kw, backend="cuda")
    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set for this whole process")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pooled_lookup(**kw, backend="triton")


def test_kernel_compiles_to_vector_loads_for_sm90():
    """Offline codegen check: fp16 rows of D=128 gather with 16-byte loads (no GPU needed)."""
    import triton
    from blsgpu.kernels import embedding_bag as kern
    from triton.backends.compiler import GPUTarget

    if kern.interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set for this whole process")
    signature = {
        "weights_ptr": "*fp16", "meta_ptr": "*i64", "indices_ptr": "*i64", "offsets_ptr": "*i64",
        "psw_ptr": "*fp32", "out_ptr": "*fp16", "N": "i32", "num_indices": "i32",
        "out_row_stride": "i32",
    }  # fmt: skip
    block_l, block_d, num_warps = kern.block_sizes(128, 20.0)
    constexprs = dict(
        MEAN=False,
        HAS_PSW=False,
        QUANTIZED=False,
        QPARAMS_ALIGNED=False,
        ROW_ALIGN=8,
        DIM_ALIGN=8,
        OUT_ALIGN=8,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
    )
    signature.update({k: "constexpr" for k in constexprs})
    names = kern.pooled_gather_kernel.arg_names
    # Divisibility by 16 that Triton would infer at launch for aligned pointers and strides.
    attrs = {
        (names.index(a),): [["tt.divisibility", 16]] for a in ("weights_ptr", "out_ptr", "out_row_stride")
    }
    src = triton.compiler.ASTSource(kern.pooled_gather_kernel, signature, constexprs, attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except Exception as e:  # no ptxas / CUDA backend in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {e}")
    ptx = compiled.asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), "row gather is not vectorised"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name",
    ["fp32_dims_sum", "fp16_psw_out_bf16", "int8_mean_out_fp16", "mixed_into_send_buffer", "one_bag_l100"],
)
def test_gpu_triton_matches_torch(name):
    case = build_case(name, CASES[name])
    kw = case["kwargs"]
    moved = {}
    for key, value in kw.items():
        if key == "tables":
            moved[key] = [t.to("cuda") for t in value]
        elif isinstance(value, torch.Tensor):
            moved[key] = value.to("cuda") if key != "out" else None
        else:
            moved[key] = value
    if case["buffer"] is not None:
        r0, _, c0 = CASES[name]["out_view"]
        buffer = case["buffer"].to("cuda")
        moved["out"] = buffer[r0 : r0 + CASES[name]["n"], c0 : c0 + kw["out"].shape[1]]
    else:
        moved.pop("out", None)
    got = pooled_lookup(**moved, backend="triton")
    rtol, atol = tolerance(kw, got.dtype)
    torch.testing.assert_close(got.double().cpu(), reference(kw), rtol=rtol, atol=atol)
    torch.testing.assert_close(
        pooled_lookup(**{**moved, "out": None}, backend="torch").double().cpu(),
        reference(kw),
        rtol=rtol,
        atol=atol,
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret-worker"]:
    _worker(sys.argv[2])
