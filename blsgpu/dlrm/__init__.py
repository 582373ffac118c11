"""DLRM inference: synthetic Criteo-like data, the model and its sharded form (re-exports only)."""

from blsgpu.dlrm.data import Batch, SyntheticCriteo, ZipfSampler
from blsgpu.dlrm.model import MLP, DLRMArch, DLRMDense, interact_dot, interaction_width, parse_arch
from blsgpu.dlrm.sharded import DLRM, make_tables, reference_predictions

__all__ = [
    "DLRM",
    "MLP",
    "Batch",
    "DLRMArch",
    "DLRMDense",
    "SyntheticCriteo",
    "ZipfSampler",
    "interact_dot",
    "interaction_width",
    "make_tables",
    "parse_arch",
    "reference_predictions",
]
