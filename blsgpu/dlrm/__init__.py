"""DLRM inference: synthetic Criteo-like data, the model, and its pipelined runner (re-exports only)."""

from blsgpu.dlrm.data import Batch, SyntheticCriteo, ZipfSampler
from blsgpu.dlrm.model import MLP, DLRMArch, DLRMDense, interact_dot, interaction_width, parse_arch
from blsgpu.dlrm.runner import DLRM, BenchConfig, analyse, make_tables, run_rank

__all__ = [
    "DLRM",
    "MLP",
    "Batch",
    "BenchConfig",
    "DLRMArch",
    "DLRMDense",
    "SyntheticCriteo",
    "ZipfSampler",
    "analyse",
    "interact_dot",
    "interaction_width",
    "make_tables",
    "parse_arch",
    "run_rank",
]
