"""DLRM inference: synthetic Criteo-like data and the dense half of the model (re-exports only)."""

from blsgpu.dlrm.data import Batch, SyntheticCriteo, ZipfSampler
from blsgpu.dlrm.model import MLP, DLRMArch, DLRMDense, interact_dot, interaction_width, parse_arch

__all__ = [
    "MLP",
    "Batch",
    "DLRMArch",
    "DLRMDense",
    "SyntheticCriteo",
    "ZipfSampler",
    "interact_dot",
    "interaction_width",
    "parse_arch",
]
