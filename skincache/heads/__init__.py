"""Classifier heads on cached features: sklearn-style estimators on numpy arrays.

Every head is registered by name and shares one fit signature (see `Head.fit`), so a CLI flag
or a benchmark loop can fit any of them:

    head = create_head("mlp", hidden=256).fit(X, y, views=V, X_val=Xv, y_val=yv, text=T)
    head.save("runs/x/head"); load_head("runs/x/head").predict_proba(X_test)

Heads never import open_clip: they work on arrays a cache provides.
"""

from __future__ import annotations

# Importing the modules registers the heads, in this order.
from . import (  # noqa: F401
    cbm,
    clap,
    clip_benchmark_lp,
    dermfm_lp,
    gda,
    knn,
    linear,
    logreg,
    lpp,
    mlp,
    proker,
    tip_adapter,
    tip_adapter_f,
    zeroshot,
    zs_linear,
)
from ._describe import HeadSpec, ParamSpec, describe_head, describe_heads, parse_params
from ._progress import progress_hook
from ._registry import HEADS, create_head, get_head_class, list_heads, register_head
from .base import (
    DEFAULT_LOGIT_SCALE,
    FitData,
    Head,
    HeadNotFittedError,
    balanced_accuracy,
    load_head,
)
from .cbm import ConceptBottleneckHead
from .clap import CLAPHead
from .clip_benchmark_lp import CLIPBenchmarkLinearProbeHead
from .dermfm_lp import DermFMLinearProbeHead
from .gda import GDAHead
from .knn import KNNHead
from .linear import LinearHead
from .logreg import LogRegHead
from .lpp import LPPlusPlusHead
from .mlp import MLPHead
from .proker import ProKeRHead
from .tip_adapter import TipAdapterHead
from .tip_adapter_f import TipAdapterFHead
from .zeroshot import ZeroShotHead, zeroshot_prototypes
from .zs_linear import ZSLinearHead

__all__ = [
    "CLAPHead",
    "CLIPBenchmarkLinearProbeHead",
    "ConceptBottleneckHead",
    "DEFAULT_LOGIT_SCALE",
    "DermFMLinearProbeHead",
    "HEADS",
    "FitData",
    "GDAHead",
    "HeadSpec",
    "ParamSpec",
    "Head",
    "HeadNotFittedError",
    "KNNHead",
    "LinearHead",
    "LogRegHead",
    "LPPlusPlusHead",
    "MLPHead",
    "ProKeRHead",
    "TipAdapterFHead",
    "TipAdapterHead",
    "ZSLinearHead",
    "ZeroShotHead",
    "balanced_accuracy",
    "create_head",
    "describe_head",
    "describe_heads",
    "get_head_class",
    "list_heads",
    "load_head",
    "parse_params",
    "progress_hook",
    "register_head",
    "zeroshot_prototypes",
]
