"""Data sources, splits, the synthetic demo set, the leakage audit and the downloader.

Everything here produces or inspects `Dataset`s of `Record`s (one per image); nothing here
decodes images for the model or knows about the cache.
"""

from ._record import SPLITS, DataError, Dataset, Record
from .audit import AuditReport, audit_dataset
from .classes import DX_NAMES, HAM10000_CLASSES, display_name
from .combine import with_test_set
from .demo import make_demo_dataset, synthetic_features
from .fetch import FetchError, fetch_ham10000
from .sources import detect_kind, load_dataset, read_image_bytes
from .splits import DEFAULT_RATIOS, assign_splits, limit_dataset

__all__ = [
    "synthetic_features",
    "DEFAULT_RATIOS",
    "DX_NAMES",
    "HAM10000_CLASSES",
    "SPLITS",
    "AuditReport",
    "DataError",
    "Dataset",
    "FetchError",
    "Record",
    "assign_splits",
    "audit_dataset",
    "detect_kind",
    "display_name",
    "fetch_ham10000",
    "limit_dataset",
    "load_dataset",
    "make_demo_dataset",
    "read_image_bytes",
    "with_test_set",
]
