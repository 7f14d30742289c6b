"""The shared shape of every head: one fit signature, input checks, and pickle-free save/load.

Every head takes the same `fit` arguments so that a CLI or a benchmark can fit any of them from a
cache without knowing which extras (views, validation split, text prototypes) it uses. A head
that needs an extra it was not given says so by name instead of failing somewhere deep inside.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as dump_safetensors
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from .._head_params import check_constraints
from .._io import atomic_write, atomic_write_text, plain_json, read_json_file, read_regular
from ..concepts import ConceptBank
from ..errors import InputFileError, NotFoundError, SkincacheError, UsageError
from ..metadata import MetadataEncoding, fit_encoding, parse_fields
from . import _posthoc
from ._math import (  # noqa: F401  (re-exported: heads import them from here)
    balanced_accuracy,
    balanced_class_weights,
    class_counts,
    l2_normalize,
    log_softmax,
    softmax,
)
from ._registry import get_head_class

#: CLIP's learned temperature, already exponentiated; used when `fit` gets no `logit_scale`.
DEFAULT_LOGIT_SCALE = 100.0

FORMAT = "skincache.head"
FORMAT_VERSION = 1
CONFIG_FILE = "head.json"
ARRAYS_FILE = "head.safetensors"


class HeadNotFittedError(SkincacheError, NotFittedError):
    """A head used (predict, linear_form, save) before `fit` or `load_head`: scikit-learn's
    NotFittedError, so `except NotFittedError` works, and skincache's, so the CLI prints one
    line instead of a traceback."""


#: what `fit` (and `load_head`) sets on every head: present together or not at all
FITTED_STATE = ("n_classes_", "n_features_in_", "log_prior_", "logit_adjust_", "temperature_")


def tta_mean(clean: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Test-time augmentation: the mean of clean-view probabilities [N, C] and the views'
    [N * K, C] (image-major, as `views.reshape(N * K, D)` gives them)."""
    n = len(clean)
    k = len(views) // max(n, 1)
    return (clean + views.reshape(n, k, -1).sum(axis=1)) / (k + 1)


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
    #: the cache's concept embeddings (`ConceptBank`), for heads that score concepts
    concepts: ConceptBank | None = None

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def n_views(self) -> int:
        return self.views.shape[1]

    @property
    def has_val(self) -> bool:
        return self.X_val is not None and len(self.X_val) > 0


def _as_features(name: str, x: Any, ndim: int, keep_half: bool = False) -> np.ndarray:
    """float32, contiguous; with `keep_half` a float16 array (a cache's stored features) is
    kept as it is, for heads that convert batches themselves (see `Head._streams`)."""
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    half = keep_half and a.dtype == np.float16
    a = np.ascontiguousarray(a, dtype=np.float16 if half else np.float32)
    flat = a.reshape(len(a), -1) if a.ndim else a.reshape(1)
    step = max(1, (64 << 20) // max(1, flat[:1].nbytes))  # check in blocks: no N x D bool mask
    if not all(np.isfinite(flat[i:i + step]).all() for i in range(0, len(flat), step)):
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
    keep_half: bool = False,
    concepts: ConceptBank | None = None,
) -> FitData:
    X = _as_features("X", X, 2, keep_half)
    n, d = X.shape
    if n == 0:
        raise ValueError("X has no rows")
    y = _as_labels("y", y, n)
    if views is None:
        views = np.zeros((n, 0, d), dtype=np.float32)
    else:
        views = _as_features("views", views, 3, keep_half)
        if views.shape[0] != n or views.shape[2] != d:
            raise ValueError(f"views must have shape [{n}, K, {d}], got {views.shape}")
    if (X_val is None) != (y_val is None):
        raise ValueError("give X_val and y_val together, or neither")
    if X_val is not None:
        X_val = _as_features("X_val", X_val, 2, keep_half)
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
    if concepts is not None:
        if not isinstance(concepts, ConceptBank):
            raise ValueError(f"concepts must be a ConceptBank, got {type(concepts).__name__}")
        if concepts.dim != d:
            raise ValueError(f"concepts have dimension {concepts.dim}, features have {d}")
    return FitData(X, y, views, X_val, y_val, text, scale, c, concepts)


def with_metadata(data: FitData, encoding: MetadataEncoding, meta: Any, meta_val: Any
                  ) -> FitData:
    """`data` with the encoded metadata appended as the last columns of X, of every view (a
    view is the same image: its metadata is its image's) and of X_val. The image columns
    come first and unchanged; the head L2-normalises only those (`Head._l2`)."""
    n, k, _ = data.views.shape
    m = encoding.width
    E = encoding.transform(meta, n, "meta").astype(data.X.dtype)
    X = np.concatenate([data.X, E], axis=1)
    views = np.concatenate(
        [data.views, np.broadcast_to(E[:, None, :], (n, k, m)).astype(data.views.dtype)], axis=2)
    X_val = data.X_val
    if X_val is not None:
        E_val = encoding.transform(meta_val, len(X_val), "meta_val").astype(X_val.dtype)
        X_val = np.concatenate([X_val, E_val], axis=1)
    return FitData(X, data.y, views, X_val, data.y_val, data.text, data.logit_scale,
                   data.n_classes)


# ----------------------------------------------------------------------------- the base class


class Head(ClassifierMixin, BaseEstimator):
    """Base class: scikit-learn's estimator contract, the uniform `fit`, the post-hoc steps every
    head shares (logit adjustment, temperature scaling), prediction, and save/load.

    Metadata (heads with a `metadata` parameter, e.g. `metadata="age,sex,localization"`):
    `fit(..., meta=, meta_val=)` learns their encoding on train (`skincache.metadata`) and
    appends it to X, the views and X_val, so `_fit` and `_predict_proba` see [N, D + m]; a head
    normalises its inputs with `_l2`, which leaves the m metadata columns as they are.
    `n_features_in_` is D + m (the head's real input width), `metadata_` the encoding (saved
    in head.json). Such a head refuses to predict without `meta`, and a head fit without
    metadata refuses `meta` (it would be ignored); `fit` itself ignores `meta` when the head
    takes none, as it ignores views or text it does not use.

    Subclasses implement `_fit(data)` and `_predict_proba(X)` (their raw probabilities); they
    list the fitted arrays and scalars that `save` must write in `_fitted_arrays` /
    `_fitted_scalars` and override `_restore` when loading must rebuild something (a torch
    module, a faiss index). Each subclass's `__init__` lists its parameters, including
    `logit_adjust` and `calibrate`, and only stores them (scikit-learn's rule, which makes
    `get_params`, `set_params`, `clone` and the repr work).

    logit_adjust: "auto" (tau chosen on the validation split by balanced accuracy; 1.0 without
    one), a fixed tau >= 0, or None/0 for the plain scores. calibrate: fit a temperature on the
    validation split (never changes the predicted class).
    """

    name: ClassVar[str] = ""
    #: heads that take float16 inputs as they are and convert batches themselves (linear, mlp,
    #: logreg, knn: a 1M-row cache is not copied to float32 whole)
    _streams: ClassVar[bool] = False
    #: heads whose method starts from the class prompt embeddings
    needs_text: ClassVar[bool] = False
    #: heads that score the cache's concept prompts (`fit(concepts=...)`)
    needs_concepts: ClassVar[bool] = False
    #: {parameter: accepted values} in skincache/_head_params.py's grammar; each registered
    #: head declares its own as a literal, which `-p` reads from the source before torch loads
    #: and `fit` checks first (one `param_violation` behind both)
    param_constraints: ClassVar[dict[str, str]] = {}
    _fitted_arrays: ClassVar[tuple[str, ...]] = ()
    _fitted_scalars: ClassVar[tuple[str, ...]] = ()
    #: written by every head (the post-hoc steps), on top of the subclass's own state
    _posthoc_arrays: ClassVar[tuple[str, ...]] = ("log_prior_",)
    _posthoc_scalars: ClassVar[tuple[str, ...]] = ("logit_adjust_", "temperature_")

    logit_adjust: Any = 0.0
    calibrate: bool = False

    @classmethod
    def _param_names(cls) -> list[str]:
        return list(cls._get_param_names())

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
        concepts: ConceptBank | None = None,
        meta: Any = None,
        meta_val: Any = None,
    ) -> Head:
        """Fit on clean-view features X [N, D] and labels y [N] in [0, C).

        views [N, K, D]: augmented-view features of the same images (heads that augment use
        them, others ignore them). X_val/y_val: the split hyper-parameters and early stopping
        are chosen on (without it each head falls back to documented defaults). text
        [C, T, D]: prompt embeddings, C classes x T templates; logit_scale: the model's
        (exp'ed) temperature, 100 when None. C is `n_classes` if given, else text.shape[0],
        else max(y)+1. concepts: the cache's concept embeddings (`ConceptBank`), used by
        heads that `needs_concepts` and ignored by the others.
        else max(y)+1. meta / meta_val: {field: [N] values} of the training / validation
        images (a cache split's `.meta`), used by heads given a `metadata` parameter.
        """
        check_constraints(self.name or type(self).__name__, self.get_params(),
                          self.param_constraints, where=f"{type(self).__name__}(")
        if self.needs_text and text is None:
            raise UsageError(
                f"head {self.name!r} needs the cache's text features (class prompt "
                "embeddings); re-encode with prompts"
            )
        if self.needs_concepts and concepts is None:
            raise UsageError(
                f"head {self.name!r} needs the cache's concept embeddings (/concepts/); "
                "re-encode the cache (skincache encode writes them by default)"
            )
        data = check_fit_inputs(
            X, y, views=views, X_val=X_val, y_val=y_val, text=text,
            logit_scale=logit_scale, n_classes=n_classes, keep_half=self._streams,
            concepts=concepts,
        )
        _posthoc.check_logit_adjust(self.logit_adjust)
        self.metadata_, self.n_meta_ = None, 0
        fields = parse_fields(getattr(self, "metadata", None))
        if fields:
            encoding = fit_encoding(fields, meta, len(data.y))
            data = with_metadata(data, encoding, meta, meta_val)
            self.metadata_, self.n_meta_ = encoding, encoding.width
        self.n_classes_ = data.n_classes
        self.classes_ = np.arange(data.n_classes)
        self.n_features_in_ = data.n_features
        self.log_prior_ = _posthoc.log_prior(data.y, data.n_classes).astype(np.float32)
        self._fit(data)
        self._fit_posthoc(data)
        return self

    def _val_score(self, data: FitData):
        """The validation score a head's own selection (C, epochs) maximises: balanced accuracy
        after the logit adjustment this head will apply. Call only when `data.has_val`."""
        assert data.y_val is not None
        return _posthoc.val_scorer(self.logit_adjust, data.y_val, self.log_prior_)

    def _fit_posthoc(self, data: FitData) -> None:
        """Choose tau (logit adjustment) and then T (temperature) on the validation split.
        Both are set here and only here, once chosen (T = 1: no calibration asked for, or no
        validation split to fit it on), so a head whose `_fit` raised is not half fitted."""
        fixed = _posthoc.check_logit_adjust(self.logit_adjust)
        if not data.has_val:
            self.logit_adjust_ = float(_posthoc.TAU_WITHOUT_VAL if fixed is None else fixed)
            self.temperature_ = 1.0
            return
        assert data.X_val is not None and data.y_val is not None
        scores = _posthoc.as_scores(self._predict_proba(data.X_val))
        if fixed is None:
            fixed = _posthoc.choose_tau(scores, data.y_val, self.log_prior_)[0]
        tau = float(fixed)
        temperature = 1.0
        if self.calibrate:
            temperature = _posthoc.fit_temperature(scores - tau * self.log_prior_, data.y_val)
        self.logit_adjust_, self.temperature_ = tau, float(temperature)

    def _fit(self, data: FitData) -> None:
        raise NotImplementedError

    def linear_form(self, posthoc: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """(W [C, D], b [C]) such that `softmax(l2_normalize(X) @ W.T + b)` is exactly
        `predict_proba(X)` (the logit adjustment and temperature folded in; `posthoc=False`:
        the head's own logits before them), for heads linear in the features; None for the
        others. Fine-tuning starts from it (`--head-init RUN`), so a new linear head only
        implements `_linear_form` and fine-tuning needs no edit. None too for a head fit with
        metadata: its logits are not a function of the image features alone."""
        self._check_fitted()
        if self._n_meta():
            return None
        raw = self._linear_form()
        if raw is None or not posthoc:
            return raw
        A, c = raw
        tau, t = float(self.logit_adjust_), float(self.temperature_)
        log_prior = np.asarray(self.log_prior_, np.float64)
        return A / t, (c - tau * log_prior) / t

    def run_files(self, classes: list[str] | None = None) -> dict[str, str]:
        """Readable files a run folder keeps beside the head ({name: text}; `cbm`: its
        concept weights as `concepts.md`); none by default."""
        return {}

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The head's raw logits as (W, b) on L2-normalised features, if linear (override)."""
        return None

    # -- prediction

    def _check_fitted(self) -> None:
        """scikit-learn's `check_is_fitted` on the state `fit` sets, raised as skincache's
        `HeadNotFittedError` (one line in the CLI): never a default standing in for it."""
        try:
            check_is_fitted(self, list(FITTED_STATE))
        except NotFittedError:
            raise HeadNotFittedError(f"head {self.name!r} is not fitted yet; call fit (or "
                                     "load_head) first") from None

    def _n_meta(self) -> int:
        """How many of the head's input columns are encoded metadata (0: none)."""
        return int(getattr(self, "n_meta_", 0))

    def metadata_fields(self) -> tuple[str, ...]:
        """The metadata fields the fitted head takes (empty: none); `predict_proba` and the
        others need them as `meta`."""
        self._check_fitted()
        enc = getattr(self, "metadata_", None)
        return () if enc is None else enc.names

    def _l2(self, X: np.ndarray) -> np.ndarray:
        """L2-normalise the image columns of X (float32); the trailing metadata columns (see
        the class doc) are kept as encoded."""
        m = self._n_meta()
        if not m:
            return l2_normalize(X)
        out = np.empty(X.shape, dtype=np.float32)
        out[:, :-m] = l2_normalize(X[:, :-m])
        out[:, -m:] = X[:, -m:]
        return out

    def _check_X(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = _as_features("X", X, 2)
        d = self.n_features_in_ - self._n_meta()
        if X.shape[1] != d:
            raise ValueError(f"X has {X.shape[1]} features, the head was fit on {d}")
        return X

    def _meta_columns(self, meta: Any, n: int) -> np.ndarray | None:
        """The encoded metadata of n images, None for a head without metadata; UsageError
        for metadata missing (naming the fields) or given to a head that takes none."""
        enc = getattr(self, "metadata_", None)
        if enc is None:
            if meta is not None:
                raise UsageError(f"head {self.name!r} was fit without metadata and would ignore "
                                 "the metadata given; fit it with -p metadata=FIELDS to use "
                                 "them")
            return None
        return enc.transform(meta, n, "meta")

    def predict_proba(self, X: np.ndarray, meta: Any = None) -> np.ndarray:
        """Class probabilities [N, C] (float64, rows sum to 1), after the logit adjustment and
        the temperature chosen on validation. meta: {field: [N] values}, for a head fit with
        metadata (and only for one)."""
        return self._posthoc(self._raw_proba(X, meta), self.temperature_)

    def predict_proba_uncalibrated(self, X: np.ndarray, meta: Any = None) -> np.ndarray:
        """As `predict_proba` without the temperature (T = 1): the "before" of calibration."""
        return self._posthoc(self._raw_proba(X, meta), 1.0)

    def predict_proba_tta(self, X: np.ndarray, views: np.ndarray | None,
                          meta: Any = None) -> np.ndarray:
        """Test-time augmentation for free: the mean of `predict_proba` over the clean view
        X [N, D] and the cached augmented views [N, K, D] of the same images (K = 0 or None:
        the clean view alone)."""
        return self.predict_proba_pair(X, views, meta)[0]

    def predict_proba_pair(self, X: np.ndarray, views: np.ndarray | None = None,
                           meta: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, uncalibrated) probabilities from one pass of the head over X (and, with
        views [N, K, D], over the views too: each the TTA mean; a view takes its image's
        metadata). What an evaluation reports twice (metrics after calibration, ECE before)
        costs one forward pass."""
        raw = self._raw_proba(X, meta)
        t = self.temperature_
        cal, unc = self._posthoc(raw, t), self._posthoc(raw, 1.0)
        if views is None or views.ndim != 3 or views.shape[1] == 0 or len(X) == 0:
            return cal, unc
        n, k, d = views.shape
        raw_v = self._raw_proba(np.asarray(views, dtype=np.float32).reshape(n * k, d), meta,
                                repeat=k)
        return (tta_mean(cal, self._posthoc(raw_v, t)),
                tta_mean(unc, self._posthoc(raw_v, 1.0)))

    def _raw_proba(self, X: np.ndarray, meta: Any = None, *, repeat: int = 1) -> np.ndarray:
        """The subclass's own probabilities, before the post-hoc steps (input checked);
        `repeat`: X holds `repeat` rows per image of `meta` (the views, image-major)."""
        X = self._check_X(X)
        E = self._meta_columns(meta, len(X) // max(repeat, 1))
        if E is not None:
            if len(E) * repeat != len(X):
                raise UsageError(f"meta describes {len(E)} images, X has {len(X)} rows")
            X = np.concatenate([X, np.repeat(E, repeat, axis=0)], axis=1)
        if len(X) == 0:
            return np.zeros((0, self.n_classes_), dtype=np.float64)
        return self._predict_proba(X)

    def _posthoc(self, raw: np.ndarray, temperature: float) -> np.ndarray:
        tau = self.logit_adjust_
        if len(raw) == 0 or (tau == 0.0 and temperature == 1.0):
            return raw
        scores = (_posthoc.as_scores(raw) - tau * self.log_prior_) / temperature
        scores[raw <= 0] = -np.inf  # a class the head rules out stays ruled out
        return softmax(scores)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, X: np.ndarray, meta: Any = None) -> np.ndarray:
        """Class indices [N] (int64): the argmax of `predict_proba`."""
        return self.predict_proba(X, meta).argmax(axis=1).astype(np.int64)

    # -- persistence (never pickle: safetensors for arrays, JSON for everything else)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(getattr(self, k)) for k in self._fitted_arrays}

    def _state_scalars(self) -> dict[str, Any]:
        return {k: plain_json(getattr(self, k)) for k in self._fitted_scalars}

    def _posthoc_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return ({k: np.ascontiguousarray(getattr(self, k)) for k in self._posthoc_arrays},
                {k: float(getattr(self, k)) for k in self._posthoc_scalars})

    def _restore(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        for k, v in arrays.items():
            setattr(self, k, v)
        for k, v in scalars.items():
            setattr(self, k, v)

    def save(self, directory: str | Path) -> Path:
        """Write `head.json` (name, params, class count, fitted scalars) and `head.safetensors`
        (fitted arrays) into `directory` (created if needed); returns the directory."""
        self._check_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        post_arrays, post_scalars = self._posthoc_state()
        arrays = {**self._state_arrays(), **post_arrays}
        # serialised in memory, then written atomically: a full disk is an OSError naming the
        # file (one line in the CLI), never safetensors' own error or half a file
        blob = dump_safetensors(arrays)
        atomic_write(out / ARRAYS_FILE, lambda f: f.write(blob))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "params": {k: plain_json(v) for k, v in self.get_params().items()},
            "n_classes": int(self.n_classes_),
            "n_features_in": int(self.n_features_in_),
            "fitted": self._state_scalars(),
            "posthoc": post_scalars,
            "arrays": sorted(arrays),
            **({} if (enc := getattr(self, "metadata_", None)) is None
               else {"metadata": enc.to_json()}),
            # checked on load: another run's same-shape arrays, or edited ones, are refused
            "arrays_sha256": hashlib.sha256(blob).hexdigest(),
        }
        atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return out


#: Bounds a saved head must respect before anything is allocated from it: far above any
#: real dermoscopy problem (7-8 classes, 512-1024 features), far below "745 GiB".
MAX_CLASSES = 100_000
MAX_FEATURES = 65_536
MAX_INT_PARAM = 1_000_000
MAX_CONFIG_BYTES = 10 * 1024 * 1024
MAX_ARRAYS_BYTES = 16 << 30
#: |weight| above this is no fitted value (1e308 overflows the first matmul); post-hoc bounds
#: far outside what `_posthoc` fits (tau <= 2 on its grid, temperature in [0.05, 20]).
MAX_ABS_WEIGHT = 1e12
MAX_LOGIT_ADJUST = 1e3
TEMPERATURE_RANGE = (1e-3, 1e3)
#: the dtypes `save` writes (features and weights as float, neighbour labels and rows as int)
SAVED_DTYPES = frozenset({np.dtype(t) for t in ("float16", "float32", "float64", "int32",
                                                "int64")})
_CONFIG_KEYS = {"format", "format_version", "name", "class", "params", "n_classes",
                "n_features_in", "fitted", "arrays", "posthoc", "arrays_sha256", "metadata"}


def _bad(path: Path, problem: str) -> InputFileError:
    return InputFileError(f"{path}: {problem}")


def _read_config(cfg_path: Path) -> dict[str, Any]:
    """`head.json`, checked against its schema: every key known, every type and bound right,
    so that a hand-made file cannot make `load_head` allocate or call anything unexpected."""
    config = read_json_file(cfg_path, max_bytes=MAX_CONFIG_BYTES, what="head config")
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
    for key, kind in (("name", str), ("params", dict), ("fitted", dict), ("arrays", list),
                      ("arrays_sha256", str)):
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
        raise NotFoundError(f"{cfg_path}: no saved head here")
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
        raise NotFoundError(f"{arrays_path}: the head's arrays are missing")
    blob = read_regular(arrays_path, max_bytes=MAX_ARRAYS_BYTES, what="head arrays")
    try:
        arrays = load_safetensors(blob)
    except Exception as e:  # SafetensorError: random bytes, a pickle, truncation
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise _bad(arrays_path, f"not a valid safetensors file ({msg})") from None
    want = config.get("arrays_sha256")  # absent in heads saved before it was recorded
    if want is not None and hashlib.sha256(blob).hexdigest() != want:
        raise _bad(arrays_path, "does not match the sha256 head.json recorded when the head was "
                   "saved (edited, or another run's file); restore it or fit the head again")
    del blob
    missing = set(cls._fitted_arrays) - set(arrays)
    if missing:
        raise _bad(arrays_path, f"missing arrays {sorted(missing)}")
    _check_arrays(arrays_path, cls, arrays, config.get("arrays"))
    n_classes, n_features = int(config["n_classes"]), int(config["n_features_in"])
    if arrays and not any(a.shape and a.shape[-1] == n_features for a in arrays.values()):
        raise _bad(cfg_path, f"n_features_in = {n_features} matches no saved array "
                   f"(shapes {sorted({a.shape for a in arrays.values()})})")
    head.n_classes_ = n_classes
    head.classes_ = np.arange(head.n_classes_)
    head.n_features_in_ = n_features
    head.metadata_, head.n_meta_ = _read_metadata(cfg_path, config, head, n_features)
    post = config.get("posthoc", {})
    if not isinstance(post, dict):
        raise _bad(cfg_path, "posthoc must be a JSON object")
    _check_values(cfg_path, "posthoc", post, set(Head._posthoc_scalars))
    head.log_prior_ = arrays.pop("log_prior_", np.zeros(n_classes, dtype=np.float32))
    if head.log_prior_.shape != (n_classes,):
        raise _bad(arrays_path, f"log_prior_ has shape {head.log_prior_.shape}, expected "
                   f"({n_classes},)")
    try:
        head.logit_adjust_ = float(post.get("logit_adjust_", 0.0))
        head.temperature_ = float(post.get("temperature_", 1.0))
    except (TypeError, ValueError):
        raise _bad(cfg_path, "posthoc values must be numbers") from None
    lo, hi = TEMPERATURE_RANGE
    if not (abs(head.logit_adjust_) <= MAX_LOGIT_ADJUST and lo <= head.temperature_ <= hi):
        raise _bad(cfg_path, f"posthoc out of range: {post}")
    try:
        head._restore(arrays, fitted)
    except Exception as e:  # shapes that do not fit the params, ...
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise _bad(d, f"the saved arrays do not fit the head's configuration ({msg})") from None
    return head


def _read_metadata(cfg_path: Path, config: dict[str, Any], head: Head, n_features: int
                   ) -> tuple[MetadataEncoding | None, int]:
    """The saved metadata encoding (None without one), checked against the head's
    `metadata` parameter and its input width."""
    try:
        asked = parse_fields(getattr(head, "metadata", None))
    except UsageError as e:
        raise _bad(cfg_path, f"params.metadata: {e}") from None
    if "metadata" not in config:
        if asked:
            raise _bad(cfg_path, f"params ask for metadata {','.join(asked)} but no metadata "
                       "encoding was saved")
        return None, 0
    try:
        enc = MetadataEncoding.from_json(config["metadata"])
    except (ValueError, UsageError) as e:
        raise _bad(cfg_path, str(e)) from None
    if enc.names != asked:
        raise _bad(cfg_path, f"the metadata encoding holds {','.join(enc.names)}, params ask "
                   f"for {','.join(asked) or 'none'}")
    if not 0 < enc.width < n_features:
        raise _bad(cfg_path, f"n_features_in = {n_features} leaves no room for the "
                   f"{enc.width} metadata columns")
    return enc, enc.width


def _check_arrays(path: Path, cls: type[Head], arrays: dict[str, np.ndarray],
                  declared: Any) -> None:
    """Only the arrays the head declares, of a dtype `save` writes, finite and in range.

    An array named like an attribute (`predict_proba`, `temperature_`) would be set on the
    head by `_restore` and replace a method or a post-hoc value; a NaN, inf or 1e308 weight
    gives NaN probabilities that look like results."""
    names = set(arrays)
    if declared is not None and names != set(declared):
        raise _bad(path, f"holds arrays {sorted(names)}, head.json declares {sorted(declared)}")
    own = set(cls._fitted_arrays) | set(cls._posthoc_arrays)
    reserved = (set(cls._param_names()) | set(cls._fitted_scalars) | set(cls._posthoc_scalars)
                | {"n_classes_", "classes_", "n_features_in_", "module_"})
    stray = sorted(n for n in names - own if not n.startswith("module.")
                   and (hasattr(cls, n) or n in reserved or not n.isidentifier()))
    if stray or (cls._fitted_arrays and names - own):
        raise _bad(path, f"arrays {stray or sorted(names - own)} are not arrays a "
                   f"'{cls.name}' head saves")
    for k, a in arrays.items():
        if a.dtype not in SAVED_DTYPES:
            raise _bad(path, f"array {k} is {a.dtype}; a saved head holds only "
                       f"{sorted(str(t) for t in SAVED_DTYPES)}")
        if a.dtype.kind == "f" and a.size and not (
                np.isfinite(a).all() and np.abs(a).max() <= MAX_ABS_WEIGHT):
            raise _bad(path, f"array {k} holds NaN, inf or values beyond "
                       f"{MAX_ABS_WEIGHT:.0e}; not a fitted head (restore it or fit again)")
