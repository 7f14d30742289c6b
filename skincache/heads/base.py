"""The shared shape of every head: one fit signature, input checks, and pickle-free save/load.

Every head takes the same `fit` arguments so that a CLI or a benchmark can fit any of them from a
cache without knowing which extras (views, validation split, text prototypes) it uses. A head
that needs an extra it was not given says so by name instead of failing somewhere deep inside.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.exceptions import NotFittedError

from ..errors import InputFileError
from ._registry import get_head_class

#: CLIP's learned temperature, already exponentiated; used when `fit` gets no `logit_scale`.
DEFAULT_LOGIT_SCALE = 100.0

FORMAT = "skincache.head"
FORMAT_VERSION = 1
CONFIG_FILE = "head.json"
ARRAYS_FILE = "head.safetensors"


# ----------------------------------------------------------------------------- numeric helpers


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Unit vectors along `axis` (zero vectors stay zero rather than becoming NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64, stable for the large logits a logit scale of 100 produces."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in `y_true`, as `sklearn.metrics.
    balanced_accuracy_score` defines it; a few times faster, which matters inside the
    per-epoch early-stopping check and the hyper-parameter grids."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    classes, inverse, counts = np.unique(y_true, return_inverse=True, return_counts=True)
    correct = (y_true == y_pred).astype(np.float64)
    hits = np.bincount(inverse, weights=correct, minlength=classes.size)
    return float(np.mean(hits / counts))


def class_counts(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y, minlength=n_classes).astype(np.int64)


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """N / (C_present * count_c), scikit-learn's "balanced" weights; 0 for absent classes."""
    counts = class_counts(y, n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes, dtype=np.float64)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


# ----------------------------------------------------------------------------- fit inputs


@dataclass
class FitData:
    """`fit`'s arguments after checking: float32 arrays, int64 labels, views always present
    (shape [N, 0, D] when there are none), text as [C, T, D], and the class count resolved."""

    X: np.ndarray
    y: np.ndarray
    views: np.ndarray
    X_val: np.ndarray | None
    y_val: np.ndarray | None
    text: np.ndarray | None
    logit_scale: float
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def n_views(self) -> int:
        return self.views.shape[1]

    @property
    def has_val(self) -> bool:
        return self.X_val is not None and len(self.X_val) > 0


def _as_features(name: str, x: Any, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _as_labels(name: str, y: Any, n: int) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.mod(a, 1) == 0):
            raise ValueError(f"{name} must hold integer class indices")
    return a.astype(np.int64)


def resolve_n_classes(
    y: np.ndarray, n_classes: int | None, text: np.ndarray | None, *extra_labels: np.ndarray
) -> int:
    """The class count, in one documented order: the explicit `n_classes`, else the number of
    text prototypes, else max label + 1 (over y and any validation labels). A rare class that
    is missing from a small training split therefore still gets a column when the caller
    passes `n_classes` or text."""
    if n_classes is not None:
        c = int(n_classes)
        if text is not None and text.shape[0] != c:
            raise ValueError(f"n_classes={c} but text has {text.shape[0]} class prototypes")
    elif text is not None:
        c = int(text.shape[0])
    else:
        c = int(max([int(a.max()) for a in (y, *extra_labels) if a.size] or [-1])) + 1
    if c < 2:
        raise ValueError(f"need at least 2 classes, got {c}")
    for a in (y, *extra_labels):
        if a.size and (a.min() < 0 or a.max() >= c):
            raise ValueError(f"labels must lie in [0, {c}), got [{a.min()}, {a.max()}]")
    return c


def check_fit_inputs(
    X: Any,
    y: Any,
    *,
    views: Any = None,
    X_val: Any = None,
    y_val: Any = None,
    text: Any = None,
    logit_scale: float | None = None,
    n_classes: int | None = None,
) -> FitData:
    X = _as_features("X", X, 2)
    n, d = X.shape
    if n == 0:
        raise ValueError("X has no rows")
    y = _as_labels("y", y, n)
    if views is None:
        views = np.zeros((n, 0, d), dtype=np.float32)
    else:
        views = _as_features("views", views, 3)
        if views.shape[0] != n or views.shape[2] != d:
            raise ValueError(f"views must have shape [{n}, K, {d}], got {views.shape}")
    if (X_val is None) != (y_val is None):
        raise ValueError("give X_val and y_val together, or neither")
    if X_val is not None:
        X_val = _as_features("X_val", X_val, 2)
        if X_val.shape[1] != d:
            raise ValueError(f"X_val has {X_val.shape[1]} features, X has {d}")
        y_val = _as_labels("y_val", y_val, X_val.shape[0])
    if text is not None:
        text = np.asarray(text)
        if text.ndim == 2:  # one template: [C, D]
            text = text[:, None, :]
        text = _as_features("text", text, 3)
        if text.shape[2] != d:
            raise ValueError(f"text has dimension {text.shape[2]}, features have {d}")
        if text.shape[1] == 0:
            raise ValueError("text has no templates")
    extra = (y_val,) if y_val is not None else ()
    c = resolve_n_classes(y, n_classes, text, *extra)
    scale = DEFAULT_LOGIT_SCALE if logit_scale is None else float(logit_scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale}")
    return FitData(X, y, views, X_val, y_val, text, scale, c)


# ----------------------------------------------------------------------------- the base class


class Head:
    """Base class: sklearn-style parameters, the uniform `fit`, prediction, and save/load.

    Subclasses implement `_fit(data)` and `_predict_proba(X)`; they list the fitted arrays and
    scalars that `save` must write in `_fitted_arrays` / `_fitted_scalars` and override
    `_restore` when loading must rebuild something (a torch module, a faiss index).
    """

    name: ClassVar[str] = ""
    #: heads whose method starts from the class prompt embeddings
    needs_text: ClassVar[bool] = False
    _fitted_arrays: ClassVar[tuple[str, ...]] = ()
    _fitted_scalars: ClassVar[tuple[str, ...]] = ()

    # -- parameters (sklearn's get_params/set_params contract, without deep nesting)

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any) -> Head:
        valid = set(self._param_names())
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"head {self.name!r} has no parameter {k!r}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitting

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        views: np.ndarray | None = None,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        text: np.ndarray | None = None,
        logit_scale: float | None = None,
        n_classes: int | None = None,
    ) -> Head:
        """Fit on clean-view features X [N, D] and labels y [N] in [0, C).

        views [N, K, D]: augmented-view features of the same images (heads that augment use
        them, others ignore them). X_val/y_val: the split hyper-parameters and early stopping
        are chosen on (without it each head falls back to documented defaults). text
        [C, T, D]: prompt embeddings, C classes x T templates; logit_scale: the model's
        (exp'ed) temperature, 100 when None. C is `n_classes` if given, else text.shape[0],
        else max(y)+1.
        """
        if self.needs_text and text is None:
            raise ValueError(
                f"head {self.name!r} needs the cache's text features (class prompt "
                "embeddings); re-encode with prompts"
            )
        data = check_fit_inputs(
            X, y, views=views, X_val=X_val, y_val=y_val, text=text,
            logit_scale=logit_scale, n_classes=n_classes,
        )
        self.n_classes_ = data.n_classes
        self.classes_ = np.arange(data.n_classes)
        self.n_features_in_ = data.n_features
        self._fit(data)
        return self

    def _fit(self, data: FitData) -> None:
        raise NotImplementedError

    # -- prediction

    def _check_X(self, X: Any) -> np.ndarray:
        if not hasattr(self, "n_classes_"):
            raise NotFittedError(f"head {self.name!r} is not fitted yet; call fit first")
        X = _as_features("X", X, 2)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the head was fit on "
                             f"{self.n_features_in_}")
        return X

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities [N, C] (float64, rows sum to 1)."""
        X = self._check_X(X)
        if len(X) == 0:
            return np.zeros((0, self.n_classes_), dtype=np.float64)
        return self._predict_proba(X)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class indices [N] (int64): the argmax of `predict_proba`."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    # -- persistence (never pickle: safetensors for arrays, JSON for everything else)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(getattr(self, k)) for k in self._fitted_arrays}

    def _state_scalars(self) -> dict[str, Any]:
        return {k: _json_scalar(getattr(self, k)) for k in self._fitted_scalars}

    def _restore(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        for k, v in arrays.items():
            setattr(self, k, v)
        for k, v in scalars.items():
            setattr(self, k, v)

    def save(self, directory: str | Path) -> Path:
        """Write `head.json` (name, params, class count, fitted scalars) and `head.safetensors`
        (fitted arrays) into `directory` (created if needed); returns the directory."""
        if not hasattr(self, "n_classes_"):
            raise NotFittedError(f"head {self.name!r} is not fitted; nothing to save")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays = self._state_arrays()
        save_file(arrays, str(out / ARRAYS_FILE))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "params": {k: _json_param(v) for k, v in self.get_params().items()},
            "n_classes": int(self.n_classes_),
            "n_features_in": int(self.n_features_in_),
            "fitted": self._state_scalars(),
            "arrays": sorted(arrays),
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return out


#: Bounds a saved head must respect before anything is allocated from it: far above any
#: real dermoscopy problem (7-8 classes, 512-1024 features), far below "745 GiB".
MAX_CLASSES = 100_000
MAX_FEATURES = 65_536
MAX_INT_PARAM = 1_000_000
MAX_CONFIG_BYTES = 10 * 1024 * 1024
_CONFIG_KEYS = {"format", "format_version", "name", "class", "params", "n_classes",
                "n_features_in", "fitted", "arrays"}


def _bad(path: Path, problem: str) -> InputFileError:
    return InputFileError(f"{path}: {problem}")


def _read_config(cfg_path: Path) -> dict[str, Any]:
    """`head.json`, checked against its schema: every key known, every type and bound right,
    so that a hand-made file cannot make `load_head` allocate or call anything unexpected."""
    try:
        size = cfg_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise _bad(cfg_path, f"{size:,} bytes; a head config is a few KB")
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _bad(cfg_path, "not UTF-8 text (not a head config)") from None
    except json.JSONDecodeError as e:
        raise _bad(cfg_path, f"not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise _bad(cfg_path, "not a JSON object (not a head config)")
    if config.get("format") != FORMAT:
        raise _bad(cfg_path, f"not a skincache head (format={config.get('format')!r})")
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise _bad(cfg_path, f"unknown keys {unknown}")
    version = config.get("format_version", 0)
    if not _is_int(version):
        raise _bad(cfg_path, f"format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise _bad(cfg_path, f"format version {version} is newer than this skincache reads "
                   f"({FORMAT_VERSION}); upgrade skincache")
    for key, lo, hi in (("n_classes", 2, MAX_CLASSES), ("n_features_in", 1, MAX_FEATURES)):
        v = config.get(key)
        if not _is_int(v) or not lo <= v <= hi:
            raise _bad(cfg_path, f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    for key, kind in (("name", str), ("params", dict), ("fitted", dict), ("arrays", list)):
        if key in config and not isinstance(config[key], kind):
            raise _bad(cfg_path, f"{key} must be a JSON {kind.__name__}, got "
                       f"{type(config[key]).__name__}")
    if "name" not in config or "params" not in config:
        raise _bad(cfg_path, "missing 'name' or 'params'")
    return config


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_values(cfg_path: Path, where: str, values: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise _bad(cfg_path, f"{where}: unknown keys {unknown} (known: {sorted(allowed)})")
    for k, v in values.items():
        items = v if isinstance(v, list) else [v]
        for x in items:
            if not (x is None or isinstance(x, (bool, int, float, str))):
                raise _bad(cfg_path, f"{where}.{k}: {type(x).__name__} is not a parameter value")
            if _is_int(x) and abs(x) > MAX_INT_PARAM:
                raise _bad(cfg_path, f"{where}.{k} = {x} is out of range (|value| <= "
                           f"{MAX_INT_PARAM:,})")


def load_head(directory: str | Path) -> Head:
    """Rebuild a head written by `Head.save`: JSON + safetensors, nothing is unpickled.

    The JSON is validated against its schema before anything is built or allocated, and every
    problem with either file is one `InputFileError` line naming the file."""
    d = Path(directory)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no saved head here")
    config = _read_config(cfg_path)
    try:
        cls = get_head_class(config["name"])
    except ValueError as e:
        raise _bad(cfg_path, str(e)) from None
    params = config["params"]
    _check_values(cfg_path, "params", params, set(cls._param_names()))
    fitted = dict(config.get("fitted", {}))
    _check_values(cfg_path, "fitted", fitted, set(cls._fitted_scalars))
    try:
        head = cls(**params)
    except (TypeError, ValueError) as e:
        raise _bad(cfg_path, f"bad params ({e})") from None
    arrays_path = d / ARRAYS_FILE
    if not arrays_path.is_file():
        raise FileNotFoundError(f"{arrays_path}: the head's arrays are missing")
    try:
        arrays = load_file(str(arrays_path))
    except Exception as e:  # SafetensorError, OSError: random bytes, a pickle, truncation
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise _bad(arrays_path, f"not a valid safetensors file ({msg})") from None
    missing = set(cls._fitted_arrays) - set(arrays)
    if missing:
        raise _bad(arrays_path, f"missing arrays {sorted(missing)}")
    n_classes, n_features = int(config["n_classes"]), int(config["n_features_in"])
    if arrays and not any(a.shape and a.shape[-1] == n_features for a in arrays.values()):
        raise _bad(cfg_path, f"n_features_in = {n_features} matches no saved array "
                   f"(shapes {sorted({a.shape for a in arrays.values()})})")
    head.n_classes_ = n_classes
    head.classes_ = np.arange(head.n_classes_)
    head.n_features_in_ = n_features
    try:
        head._restore(arrays, fitted)
    except Exception as e:  # shapes that do not fit the params, ...
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise _bad(d, f"the saved arrays do not fit the head's configuration ({msg})") from None
    return head


def _json_scalar(v: Any) -> Any:
    """Plain JSON: numpy scalars become Python ones, NaN/inf become null."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _json_param(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_param(x) for x in v]
    return _json_scalar(v)
