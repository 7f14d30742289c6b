"""DermFM-Zero's linear probe, as its code runs it, so a number sits beside their published table.

Read from the DermFM-Zero repository (`linear_probe/linear_eval.py` and
`linear_probe/panderm_model/downstream/eval_features/{linear_probe,logistic_regression}.py`):

- the frozen features as the encoder returns them: no L2 normalisation (`normalize=False`);
- a fixed cost C = D x n_classes / 100, n_classes the distinct labels of the fit rows (7 on
  HAM10000: C = 1280 x 7 / 100 = 89.6 for 1280-d features); no sweep;
- their own torch logistic regression (`use_sklearn=False` is their default): multinomial
  cross-entropy averaged over the rows plus ||W||_F / (2 C), the Frobenius norm itself, not its
  square (`objective="dermfm"`); `objective="sklearn"` is scikit-learn's
  `LogisticRegression(C=C)` instead (their `use_sklearn=True`; summed loss, squared norm);
- full-batch L-BFGS with a strong-Wolfe line search, max_iter 1,000 (torch's budget: 1,250
  evaluations), from torch's default `nn.Linear` initialisation under `torch.manual_seed(0)`
  (their one seed, `range(1)`);
- the fit rows: their `train_linear_probe` merges train and val (`combine_trainval=True`) only
  when it is given val features, and `linear_eval.py` passes `valid_feats=None`: the published
  predictions were fit on **train only**. `merge_val=False` (the default) is that run;
  `merge_val=True` is the function's train+val merge (then val is not available for selection
  and its scores are marked "(fit)", see `trains_on_val`).

Solved by skincache's own L-BFGS (`_lbfgs`, the `logreg` head's solver: float32, centred
features, the same objective). No post-hoc step by default (`logit_adjust=None`,
`calibrate=False`): they apply none, and a published protocol is only comparable unchanged.
"""

from __future__ import annotations

import numpy as np

from skincache.errors import UsageError

from ._protocols import ProbeHead, fit_rows, full_weights, seen_classes
from ._registry import register_head
from .base import FitData

OBJECTIVES = ("dermfm", "sklearn")


def dermfm_cost(n_features: int, n_classes: int) -> float:
    """DermFM-Zero's fixed cost: C = feature dimension x number of classes / 100."""
    return n_features * n_classes / 100.0


def torch_linear_init(n_features: int, n_classes: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """torch's default `nn.Linear(D, C)` weights under `torch.manual_seed(seed)`, drawn on the
    CPU (as their probe is built before it moves to the GPU); torch's global RNG is restored."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(n_features, n_classes)
    return lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()


@register_head("dermfm-lp")
class DermFMLinearProbeHead(ProbeHead):
    """DermFM-Zero's published linear probe: L-BFGS logistic regression at C = D x classes / 100.

    Val is never used for selection (there is nothing to select: C is fixed). merge_val: False
    (default) fits on train only, as DermFM-Zero's script runs; True fits on train+val merged
    (then val is training data: `trains_on_val`, and tables show its val score as "(fit)").
    objective: "dermfm" (their torch loss: mean cross-entropy + ||W|| / (2C)) or "sklearn"
    (scikit-learn's LogisticRegression(C=C)). C: None uses D x n_classes / 100.
    max_iter: L-BFGS iterations (1,000; torch's 1.25x evaluation budget). normalize: L2-normalise
    the features first (False: DermFM-Zero uses them raw). seed: the initialisation seed (0).
    logit_adjust / calibrate: off (None / False), as published.
    """

    _fitted_scalars = ("C_",)

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"C": ">0", "max_iter": ">=1", "tol": ">0"}

    def __init__(
        self,
        merge_val: bool = False,
        objective: str = "dermfm",
        C: float | None = None,
        max_iter: int = 1000,
        tol: float = 1e-7,
        normalize: bool = False,
        init_seed: int = 0,
        device: str = "cpu",
        logit_adjust: float | str | None = None,
        calibrate: bool = False,
    ) -> None:
        self.merge_val = merge_val
        self.objective = objective
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.normalize = normalize
        self.init_seed = init_seed
        self.device = device
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    @property
    def trains_on_val(self) -> bool:
        return bool(self.merge_val)

    def _fit(self, data: FitData) -> None:
        from . import _lbfgs
        from ._torch import resolve_device

        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        X, y_all = fit_rows(data, self.merge_val)
        seen, y = seen_classes(y_all, data.n_classes)
        self.C_ = float(dermfm_cost(data.n_features, len(seen)) if self.C is None else self.C)
        if self.objective == "dermfm":  # their multinomial softmax, two classes included
            penalty, c = "norm", self.C_
        else:  # scikit-learn: one binary logistic for 2 classes, the same minimiser at C/2
            penalty, c = "squared", self.C_ * (0.5 if len(seen) == 2 else 1.0)
        init = torch_linear_init(data.n_features, len(seen), self.init_seed)
        point = next(iter(_lbfgs.logreg_path(
            self._features(X), y, [c], n_classes=len(seen), device=resolve_device(self.device),
            max_iter=self.max_iter * 5 // 4, tol=self.tol, init=init, penalty=penalty)))
        self.n_evals_ = point.n_evals
        self.coef_, self.intercept_ = full_weights(seen, point.coef, point.intercept,
                                                   data.n_classes)

