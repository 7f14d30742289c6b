"""The fine-tuned classifier: open_clip's image tower + a linear head on normalised features.

    logits = logit_scale * normalize(visual(x)) @ W^T + b

With W = the zero-shot class prototypes (prompts of ALL classes through the text tower) and
b = 0 this is CLIP's zero-shot classifier exactly, so training starts from the model's prior
and WiSE-FT can interpolate back to it. The logit scale is the model's own (fixed, a buffer);
the head runs in fp32 outside autocast so that the zero-shot start is exact under bf16 too.
The text tower never sees the label of the image being classified: it only turns every class
name into a prototype, once, before training.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skincache.encoder import encode_class_prompts
from skincache.errors import InputFileError, NotFoundError
from skincache.heads import Head, get_head_class, list_heads, load_head, zeroshot_prototypes
from skincache.models import LoadedModel
from skincache.prompts import side_by_side
from skincache.run_record import read_run


class ClipClassifier(nn.Module):
    """`visual` is the open_clip model's own image tower (shared, not copied), so the full CLIP
    state dict saved in `best.pt` always holds the fine-tuned backbone."""

    def __init__(self, visual: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                 logit_scale: float):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (fp32)."""
        return F.normalize(self.visual(x).float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        with torch.autocast(f.device.type, enabled=False):
            return self.logit_scale * F.linear(f, self.head.weight.float()) + self.head.bias


# ---------------------------------------------------------------------------- head init


def text_features(loaded: LoadedModel, classes: list[str], template_set: str) -> np.ndarray:
    """[C, T, D] prompt embeddings of every class, computed as `encode` computes the cache's
    text (one batch per template set) and, for "all", the sets side by side in sorted order as
    `fit-head --templates all` reads them: the zero-shot start is the zero-shot head's."""
    device = next(loaded.model.parameters()).device
    return side_by_side(template_set,
                        lambda s: encode_class_prompts(loaded, classes, s, device))


def zeroshot_head(loaded: LoadedModel, classes: list[str], template_set: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) = (class prototypes, 0): the zero-shot classifier `heads.ZeroShotHead` builds."""
    w = zeroshot_prototypes(text_features(loaded, classes, template_set))
    return torch.from_numpy(w), torch.zeros(len(classes))


def random_head(n_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unit-norm rows: the logits start on the zero-shot head's scale."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    return w, torch.zeros(n_classes)


def head_dir(path: str | Path) -> Path:
    """The folder holding `head.json`: the given one or its `head/` subfolder (a run dir)."""
    p = Path(path)
    for cand in (p, p / "head"):
        if (cand / "head.json").is_file():
            return cand
    raise NotFoundError(f"--head-init {path}: no saved head (head.json) there or in "
                            f"{p / 'head'}; give a `fit-head` run folder, 'zeroshot' or 'random'")


def _is_linear(name: str) -> bool:
    """Whether the head class `name` can have a linear form (overrides `linear_form`)."""
    return get_head_class(name)._linear_form is not Head._linear_form


def fitted_head(path: str | Path, logit_scale: float, n_classes: int, dim: int,
                classes: list[str], model: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) in this model's parametrisation from a linear head saved by `fit-head`, such that
    softmax(logit_scale * normalize(x) @ W^T + b) == head.predict_proba(x).

    The run's `run.json` (when there is one) must name the same classes and, given `model`,
    the same architecture: a head fit on another model's features is meaningless here."""
    d = head_dir(path)
    for meta_path in (d / "run.json", d.parent / "run.json"):
        if meta_path.is_file():
            meta = read_run(meta_path)
            saved = meta.classes
            if saved and list(saved) != list(classes):
                raise InputFileError(f"{meta_path}: the head was fit on classes {saved}, this "
                                 f"dataset has {classes}")
            if model and meta.model and meta.model.name != model:
                raise InputFileError(f"{meta_path}: the head was fit on {meta.model.name} "
                                     f"features; this run fine-tunes {model}")
            break
    head = load_head(d)
    if head.metadata_fields():  # its logits need the metadata: no linear form on the image
        raise InputFileError(f"{d}: head '{head.name}' was fit with metadata "
                             f"({', '.join(head.metadata_fields())}); --head-init takes a head "
                             "on image features alone (fit one without -p metadata)")
    if head.n_features_in_ != dim or head.n_classes_ != n_classes:
        raise InputFileError(f"{d}: head has {head.n_features_in_} features x {head.n_classes_} "
                         f"classes; the model has {dim} features and the data {n_classes} "
                         "classes (fit the head on a cache of this model and dataset)")
    form = head.linear_form()
    if form is None:
        linear = [n for n in list_heads() if _is_linear(n)]
        raise InputFileError(f"head '{head.name}' is not a linear classifier; --head-init takes "
                             f"a head with a linear form ({', '.join(linear)}; mlp with depth 0)")
    w, b = form
    w = w / float(logit_scale)
    finite = np.isfinite(b)
    if not finite.all():  # logreg gives classes absent from its training data -inf
        b = np.where(finite, b, (b[finite].min() if finite.any() else 0.0) - 50.0)
    return torch.from_numpy(w.astype(np.float32)), torch.from_numpy(b.astype(np.float32))


# ---------------------------------------------------------------------------- optimisation


_BLOCK = re.compile(r"(?:resblocks|blocks|layers|layer)\.?(\d+)")
# open_clip's own training rule: gains, biases, norms and the temperature get no weight decay.
_NO_DECAY = ("bn", "ln", "bias", "logit_scale", "norm", "embedding", "class_token", "cls_token")


def layer_ids(visual: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of each image-tower parameter (0: embeddings, i+1: block i, L+1: final norm and
    projection) and L+1; the generic reading of open_clip ViTs, timm towers and ResNets."""
    names = [n for n, _ in visual.named_parameters()]
    blocks = [_BLOCK.search(n) for n in names]
    ids_seen = sorted({int(m.group(1)) for m in blocks if m})
    rank = {b: i for i, b in enumerate(ids_seen)}
    top = len(ids_seen) + 1
    out: dict[str, int] = {}
    seen_block = False
    for n, m in zip(names, blocks, strict=True):
        if m:
            out[n] = rank[int(m.group(1))] + 1
            seen_block = True
        else:
            # open_clip lists class/positional embeddings and proj before conv1 and the blocks:
            # name the ends by what they are, not by where they are listed.
            post = n.startswith(("ln_post", "proj", "head", "attnpool", "norm", "fc_norm"))
            out[n] = top if (post or (seen_block and not n.startswith(("conv1", "ln_pre")))) else 0
    return out, top


def param_groups(model: ClipClassifier, lr: float, head_lr: float, weight_decay: float,
                 layer_decay: float) -> list[dict]:
    """AdamW groups: the head at `head_lr`; the image tower at `lr`, times layer_decay^(depth
    below the top) when layer_decay < 1; no weight decay on norms, biases and embeddings."""
    depth, top = layer_ids(model.visual)
    groups: dict[tuple[str, int, bool], dict] = {}
    for n, p in model.visual.named_parameters():
        if not p.requires_grad:
            continue
        d = depth[n]
        decay = p.ndim >= 2 and not any(k in n for k in _NO_DECAY)
        key = ("visual", d, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * layer_decay ** (top - d),
                           "weight_decay": weight_decay if decay else 0.0,
                           "name": f"visual.depth{d}" + ("" if decay else ".no_decay")}
        groups[key]["params"].append(p)
    out = [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[2]))]
    out.append({"params": [model.head.weight], "lr": head_lr, "weight_decay": weight_decay,
                "name": "head.weight"})
    out.append({"params": [model.head.bias], "lr": head_lr, "weight_decay": 0.0,
                "name": "head.bias"})
    return out


# ---------------------------------------------------------------------------- WiSE-FT


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * start + alpha * end for every float tensor (alpha 0 = start,
    1 = end); integer buffers come from `end`."""
    out = {}
    for k, v in end.items():
        s = start[k].to(v.device)
        if torch.is_floating_point(v):
            out[k] = s if alpha == 0.0 else (v if alpha == 1.0 else torch.lerp(s, v, alpha))
        else:
            out[k] = v
    return out
