"""`predict --explain`: where in the image the image tower's evidence for a class lies (and
`predict_run`, the predict command's one call, which also predicts with a finetune run).

The map is Grad-CAM (Selvaraju et al., 2017) on a ViT's patch tokens, taken end to end through
the run's OWN classifier: pixels -> the image tower -> features -> the cache's normalisation
(L2, and an `mlp` head's standardisation) -> the head's score for the target class. So the map
explains this run's prediction, not a generic CLIP saliency.

Which tokens: those entering the last transformer block. open_clip ViTs pool the class token
(`pool_type="tok"`), so the last block's *output* patch tokens never reach the features (their
gradient is exactly zero); the last block's input tokens are what its attention mixes into the
class token, which is the standard ViT Grad-CAM layer (the last block's first norm). The class
token is dropped, the P patch tokens reshaped to the patch grid:

    alpha = mean_p d score / d A_p          (one weight per channel)
    map_p = ReLU(sum_c alpha_c A_pc)        (positive evidence only; scaled to [0, 1])

Heads are differentiable when they have a linear form (`Head.linear_form()`: logreg, linear,
zeroshot, zs-linear; the post-hoc logit adjustment and temperature folded in), are a
`FeedForwardHead` (`mlp`: its torch module) or a `ProbeHead` (the linear-probe baselines, also
on raw features); the others (knn, tip-adapter, tip-adapter-f) are refused in one line. A
`finetune` run brings its own backbone and head (its final checkpoint). Towers other than
open_clip's VisionTransformer are refused in one line (not built yet).

On the shipped random `skincache-tiny` the maps are a pipeline check and mean nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from skincache._io import atomic_write, file_safe
from skincache._progress import progress_bar
from skincache._sanity import RANDOM_INIT
from skincache.data import Record
from skincache.device import resolve_device
from skincache.errors import DiskError, UsageError
from skincache.heads import Head, get_head_class, list_heads
from skincache.heads._feedforward import FeedForwardHead
from skincache.heads._protocols import ProbeHead
from skincache.loaders import load_views
from skincache.models import LoadedModel, ModelSpec, load_model
from skincache.predict import Prediction, expand_inputs, predict_images
from skincache.run_record import read_run
from skincache.runs import RunError, load_run, model_label, run_features
from skincache.views import Normalizer, ViewMaker, ViewPolicy

#: the overlay PNG's size: inches at `OVERLAY_DPI` (two panels: the image, the map over it)
OVERLAY_INCHES = (8.0, 5.0)
OVERLAY_DPI = 100
#: the default folder for overlays, inside the run folder
EXPLAIN_DIR = "explain"

Scorer = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- the heads


def differentiable_heads() -> list[str]:
    """Registered heads `--explain` can go through: those with a linear form, and the
    feed-forward (torch module) heads."""
    out = []
    for name in list_heads():
        cls = get_head_class(name)
        if (cls._linear_form is not Head._linear_form
                or issubclass(cls, (FeedForwardHead, ProbeHead))):
            out.append(name)
    return out


def head_scorer(head: Head) -> Scorer:
    """features [n, D] (as the cache holds them: not normalised) -> class scores [n, C] whose
    softmax is `head.predict_proba`, differentiable in the features. UsageError (one line,
    naming the heads that work) for a head that is not differentiable."""
    fields = head.metadata_fields() if hasattr(head, "metadata_fields") else ()
    if fields:
        raise UsageError(f"--explain: head '{head.name}' was fit with metadata "
                         f"({', '.join(fields)}) beside the image features; saliency through "
                         "such a head is not built yet (fit one without -p metadata)")
    form = head.linear_form()
    if form is not None:
        # float64: a closed-form head (gda's precision matrix) can have logits in the
        # thousands, where float32 rounding alone moves the probabilities by 1e-4
        w = torch.as_tensor(np.asarray(form[0], np.float64))
        b = np.asarray(form[1], np.float64)
        finite = np.isfinite(b)  # logreg gives a class absent from training -inf
        b = np.where(finite, b, (b[finite].min() if finite.any() else 0.0) - 50.0)
        bias = torch.as_tensor(b)

        def linear(f: torch.Tensor) -> torch.Tensor:
            z = F.normalize(f.double(), dim=-1)
            return z @ w.to(f.device).T + bias.to(f.device)

        return linear
    if isinstance(head, FeedForwardHead):
        module = head.module_
        dev = next(module.parameters()).device
        mean = torch.as_tensor(np.asarray(head.mean_, np.float32), device=dev)
        scale = torch.as_tensor(np.asarray(head.scale_, np.float32), device=dev)
        shift = torch.as_tensor(float(head.logit_adjust_) * np.asarray(head.log_prior_),
                                dtype=torch.float32, device=dev)
        t = float(head.temperature_)

        def feedforward(f: torch.Tensor) -> torch.Tensor:
            z = (F.normalize(f.float().to(dev), dim=-1) - mean) / scale
            return (module(z) - shift) / t

        return feedforward
    if isinstance(head, ProbeHead):  # linear in the raw features (normalize=False)
        coef = torch.as_tensor(np.asarray(head.coef_, np.float32))
        icpt = torch.as_tensor(np.asarray(head.intercept_, np.float32))
        adj = torch.as_tensor(float(head.logit_adjust_) * np.asarray(head.log_prior_),
                              dtype=torch.float32)
        t_probe, norm = float(head.temperature_), bool(head.normalize)

        def probe(f: torch.Tensor) -> torch.Tensor:
            z = F.normalize(f.float(), dim=-1) if norm else f.float()
            logits = z @ coef.to(f.device).T + icpt.to(f.device)
            return (logits - adj.to(f.device)) / t_probe

        return probe
    raise UsageError(f"--explain: head '{head.name}' is not differentiable in the image "
                     f"features (no linear form, no torch module), so no saliency map goes "
                     f"through it; --explain works for runs of {', '.join(differentiable_heads())}"
                     " and for finetune runs")


# ----------------------------------------------------------------------------- Grad-CAM


def vit_parts(visual: torch.nn.Module) -> tuple[torch.nn.Module, bool, tuple[int, int]]:
    """(last transformer block, batch_first, patch grid) of an open_clip VisionTransformer;
    UsageError for any other tower."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    grid = getattr(visual, "grid_size", None)
    if blocks is None or grid is None or not hasattr(visual, "class_embedding"):
        raise UsageError(f"--explain: the image tower is a {type(visual).__name__}, not an "
                         "open_clip VisionTransformer; saliency maps for other towers are not "
                         "built yet (ViT models work: ViT-B-32, ViT-B-16, skincache-tiny, ...)")
    return blocks[-1], bool(getattr(visual.transformer, "batch_first", True)), \
        (int(grid[0]), int(grid[1]))


@dataclass
class Saliency:
    """One image's map: `map` [gh, gw] in [0, 1] (0 everywhere when nothing in the image
    argues for the class), `raw` the signed Grad-CAM before ReLU, `scores` the head's
    class scores [C] from the same forward pass."""

    map: np.ndarray
    raw: np.ndarray
    target: int
    scores: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        s = self.scores - self.scores.max()
        e = np.exp(s)
        return e / e.sum()


def gradcam(visual: torch.nn.Module, scorer: Scorer, x: torch.Tensor,
            target: int | None = None) -> Saliency:
    """Grad-CAM of the class `target` (None: the top-scoring one) for one normalised image
    x [1, 3, H, W] (see the module doc), in fp32 with gradients on, whatever the caller set."""
    block, batch_first, (gh, gw) = vit_parts(visual)
    held: dict[str, torch.Tensor] = {}

    def grab(_module, args):
        tokens = args[0].detach().requires_grad_(True)
        held["tokens"] = tokens
        return (tokens, *args[1:])

    handle = block.register_forward_pre_hook(grab)
    try:
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            scores = scorer(visual(x.float()))[0]
            c = int(scores.argmax()) if target is None else int(target)
            (grad,) = torch.autograd.grad(scores[c], held["tokens"])
    finally:
        handle.remove()
    tokens = held["tokens"].detach()
    if not batch_first:
        tokens, grad = tokens.transpose(0, 1), grad.transpose(0, 1)
    a, g = tokens[0].float(), grad[0].float()  # [L, width]
    if a.shape[0] != gh * gw + 1:
        raise UsageError(f"--explain: the tower has {a.shape[0]} tokens, not a class token and "
                         f"{gh}x{gw} patches (register tokens?): not supported yet")
    a, g = a[1:], g[1:]
    raw = (a * g.mean(dim=0)).sum(dim=-1).reshape(gh, gw).cpu().numpy().astype(np.float64)
    pos = np.maximum(raw, 0.0)
    top = pos.max()
    return Saliency(map=pos / top if top > 0 else pos, raw=raw, target=c,
                    scores=scores.detach().float().cpu().numpy().astype(np.float64))


# ----------------------------------------------------------------------------- sanity check


def redraw_(params: list[torch.Tensor], seed: int) -> None:
    """Re-initialise in place: each tensor redrawn from a normal with its own mean and spread
    (magnitudes kept, learned structure gone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            spread = p.std() if p.numel() > 1 else p.abs()
            p.copy_(p.mean() + spread * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def cascade_stages(visual: torch.nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
    """The model-randomisation cascade of Adebayo et al. (2018) for an open_clip ViT, top
    first: the final norm and projection, each block from the last, then the patch and
    position embeddings; each stage's own parameters (the cascade re-draws them cumulatively)."""
    vit_parts(visual)
    blocks = list(visual.transformer.resblocks)

    def params(*mods) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for m in mods:
            if isinstance(m, torch.nn.Module):
                out += list(m.parameters())
            elif isinstance(m, torch.Tensor):
                out.append(m)
        return out

    stages = [("ln_post + proj", params(visual.ln_post, getattr(visual, "proj", None)))]
    stages += [(f"block {i}", params(blocks[i])) for i in reversed(range(len(blocks)))]
    stages.append(("embeddings", params(visual.conv1, visual.class_embedding,
                                        visual.positional_embedding, visual.ln_pre)))
    return stages


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps (0 where either is constant)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(np.ravel(a), np.ravel(b))[0])


def randomisation_check(explainer: Explainer, pixels: list[np.ndarray], seed: int = 1
                        ) -> list[dict[str, Any]]:
    """Per cascade stage (`cascade_stages`, cumulative), the rank correlation of each image's
    map (signed Grad-CAM, the original predicted class) with the original tower's. A map that
    explains the model falls towards 0; one that survives the weights (an edge detector of
    the image) stays near 1. The first row, "none", re-runs the untouched copy (rho 1)."""
    import copy

    xs = [explainer.normalize(torch.from_numpy(np.ascontiguousarray(p))[None]
                              .to(explainer.device)) for p in pixels]
    base = [gradcam(explainer.visual, explainer.scorer, x) for x in xs]
    tower = copy.deepcopy(explainer.visual)
    rows = []
    for name, params in [("none", [])] + cascade_stages(tower):
        redraw_(params, seed)
        rhos = [rank_correlation(b.raw, gradcam(tower, explainer.scorer, x, b.target).raw)
                for x, b in zip(xs, base, strict=True)]
        rows.append({"stage": name, "mean_rho": float(np.mean(rhos)), "rho": rhos})
    return rows


def randomisation_check_run(run: str | Path, inputs: list[str | Path], *, device: str = "auto",
                            cache: str | Path | None = None, seed: int = 1
                            ) -> list[dict[str, Any]]:
    """`randomisation_check` on a run's own model and head, for the images in `inputs`
    (unreadable ones skipped; none readable is a UsageError)."""
    explainer = run_explainer(Path(run), resolve_device(device), cache)
    pixels = [px for px, _ in (explainer.pixels(p) for p in expand_inputs(inputs))
              if px is not None]
    if not pixels:
        raise UsageError(f"no readable images in {' '.join(map(str, inputs))}")
    return randomisation_check(explainer, pixels, seed)


# ----------------------------------------------------------------------------- overlays


def overlay_figure(image: np.ndarray, heat: np.ndarray, title: str,
                   target: str = "the class") -> Figure:
    """The image (uint8 [H, W, 3], the model's input crop) beside itself with the map of the
    evidence for `target` (upsampled bilinearly to H x W) over it, `title` on top."""
    h, w = image.shape[:2]
    up = F.interpolate(torch.as_tensor(heat, dtype=torch.float32)[None, None], size=(h, w),
                       mode="bilinear", align_corners=False)[0, 0].numpy()
    fig = Figure(figsize=OVERLAY_INCHES, dpi=OVERLAY_DPI)
    lines = title.count("\n") + 1
    top = 0.88 - 0.045 * (lines - 1)
    fig.subplots_adjust(left=0.02, right=0.89, bottom=0.03, top=top, wspace=0.06)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(image)
    ax1.set_title("image (model input)", fontsize=9)
    ax2.imshow(image)
    im = ax2.imshow(up, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    ax2.set_title(f"Grad-CAM: evidence for {target}", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, cax=fig.add_axes((0.91, 0.08, 0.015, top - 0.16)))
    fig.suptitle(title, fontsize=10, y=0.98, va="top")
    return fig


def write_overlay(image: np.ndarray, heat: np.ndarray, title: str, path: Path,
                  target: str = "the class") -> Path:
    """`overlay_figure` as a PNG of exactly OVERLAY_INCHES x OVERLAY_DPI pixels, atomically;
    a folder that cannot be written is one DiskError line."""
    fig = overlay_figure(image, heat, title, target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=OVERLAY_DPI),
                            fsync=False)
    except OSError as e:
        raise DiskError(f"{path}: cannot write the overlay ({e.strerror or e}); choose "
                        "another --explain-dir") from None


# ----------------------------------------------------------------------------- the model


@dataclass
class Explainer:
    """What a map needs: the image tower, the run's differentiable head, the model's own
    preprocessing (clean view, normaliser) and the classes; `loaded`, the whole model (a head
    run's predictions reuse it)."""

    visual: torch.nn.Module
    scorer: Scorer
    maker: ViewMaker
    normalize: Normalizer
    classes: list[str]
    label: str
    device: torch.device
    loaded: LoadedModel | None = None

    def target_index(self, target: str | int | None) -> int | None:
        """A class name or index -> index (None stays None: the predicted class)."""
        if target is None:
            return None
        if isinstance(target, str) and target in self.classes:
            return self.classes.index(target)
        if isinstance(target, int) and 0 <= target < len(self.classes):
            return target
        raise UsageError(f"target class {target!r}: not one of this run's classes "
                         f"({', '.join(self.classes)})")

    def pixels(self, path: Path) -> tuple[np.ndarray | None, str]:
        """(uint8 [3, H, W] clean view, '') or (None, why), decoded as encode decodes."""
        _, views, reason = load_views(Record(image_id=path.stem, source=str(path), label=""),
                                      self.maker)
        return (None, reason) if views is None else (views[0], "")

    def saliency(self, pixels: np.ndarray, target: int | None = None) -> Saliency:
        x = self.normalize(torch.from_numpy(np.ascontiguousarray(pixels))[None]
                           .to(self.device))
        return gradcam(self.visual, self.scorer, x, target)


def _head_explainer(loaded: LoadedModel, scorer: Scorer, classes: list[str], label: str,
                    device: torch.device, maps: bool = True) -> Explainer:
    if maps:
        vit_parts(loaded.model.visual)  # a tower we cannot explain is said before any image
    return Explainer(loaded.model.visual, scorer, ViewMaker(loaded.preprocess, ViewPolicy(k=0)),
                     Normalizer(loaded.preprocess, device), classes, label, device, loaded)


def final_checkpoint(run: Path, record_extra: dict[str, Any]) -> Path:
    """A finetune run's final weights: the WiSE-FT interpolation when it wrote one, else the
    best epoch's, else the last epoch's."""
    names = record_extra.get("checkpoints") or {}
    for key in ("wise", "best", "last"):
        p = run / str(names.get(key, f"{key}.pt"))
        if p.is_file():
            return p
    raise RunError(f"{run}: a finetune run without a checkpoint (wise.pt, best.pt or "
                   "last.pt); finish or resume it first")


def finetune_explainer(run: Path, device: torch.device, maps: bool = True) -> Explainer:
    """A finetune run's own backbone and head from its final checkpoint (read with
    weights_only=True): scores = logit_scale * normalize(visual(x)) @ W^T + b. `maps=False`:
    for predictions only (any tower)."""
    from skincache.finetune import load_checkpoint

    record = read_run(run)
    path = final_checkpoint(run, record.extra)
    ckpt = load_checkpoint(path)
    m = ckpt.get("model") or {}
    name = str(m.get("name") or (record.model.name if record.model else ""))
    hub = name.startswith("hf-hub:")
    loaded = load_model(ModelSpec(name, m.get("pretrained") if hub else None), "cpu")
    try:
        loaded.model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise RunError(f"{path}: its weights do not fit {name}") from None
    loaded.model.to(device).eval()
    w = ckpt["head"]["weight"].float().to(device)
    b = ckpt["head"]["bias"].float().to(device)
    s = float(ckpt["head"]["logit_scale"])

    def clip_head(f: torch.Tensor) -> torch.Tensor:
        return s * F.normalize(f.float(), dim=-1) @ w.T + b

    classes = list(ckpt.get("classes") or record.classes or [])
    weights = Path(str(m["checkpoint"])).name if m.get("checkpoint") else m.get("pretrained")
    label = f"{name} ({weights or RANDOM_INIT}) fine-tuned (run {run.name})"
    return _head_explainer(loaded, clip_head, classes, label, device, maps)


def run_explainer(run: Path, device: torch.device, cache: str | Path | None = None
                  ) -> Explainer:
    """The explainer of a head run (the cache's model + the run's head; the head's
    differentiability checked before the model loads) or of a finetune run."""
    record = read_run(run)
    if record.kind == "finetune":
        return finetune_explainer(run, device)
    if record.caches:
        raise UsageError(f"--explain: {run} is fused from {len(record.caches)} caches "
                         f"({record.fusion} fusion); saliency through several image towers is "
                         "not built yet (explain a run of one cache)")
    loaded_run = load_run(run)
    if run_features(loaded_run.record) == "pre":
        raise UsageError(f"--explain: {run} was fit on pre-projection features "
                         "(-p features=pre); saliency through them is not built yet")
    scorer = head_scorer(loaded_run.head)
    fc = loaded_run.open_cache(cache)
    loaded = load_model(ModelSpec(*fc.header.model_spec()), device)
    label = f"{model_label(dict(fc.attrs))} + {loaded_run.head.name} (run {run.name})"
    return _head_explainer(loaded, scorer, list(fc.classes), label, device)


# ----------------------------------------------------------------------------- predict


def _finetune_predictions(paths: list[Path], explainer: Explainer, maps: bool = True
                          ) -> tuple[list[Prediction], dict[int, tuple[np.ndarray, Saliency]]]:
    """Predictions of a finetune run (its own forward pass, fp32; no cache, so no
    neighbours), with each image's map of its predicted class when `maps`."""
    preds, done = [], {}
    for i, p in enumerate(paths):
        pred = Prediction(str(p))
        pixels, reason = explainer.pixels(p)
        if pixels is None:
            pred.error = reason
        elif not maps:
            with torch.no_grad():
                x = explainer.normalize(torch.from_numpy(pixels)[None].to(explainer.device))
                s = explainer.scorer(explainer.visual(x.float()))[0].cpu().double().numpy()
            proba = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            pred.probabilities = {c: float(v) for c, v in zip(explainer.classes, proba,
                                                              strict=True)}
            pred.predicted = explainer.classes[int(proba.argmax())]
        else:
            sal = explainer.saliency(pixels)
            proba = sal.probabilities
            pred.probabilities = {c: float(v) for c, v in zip(explainer.classes, proba,
                                                              strict=True)}
            pred.predicted = explainer.classes[int(proba.argmax())]
            done[i] = (pixels, sal)
        preds.append(pred)
    return preds, done


def _overlay_name(path: Path, cls: str, taken: set[str]) -> str:
    base = file_safe(f"{path.stem}_{cls}")
    name, k = f"{base}.png", 2
    while name in taken:
        name, k = f"{base}-{k}.png", k + 1
    taken.add(name)
    return name


def predict_run(
    run: str | Path,
    inputs: list[str | Path],
    *,
    explain: bool = False,
    explain_dir: str | Path | None = None,
    target_class: str | int | None = None,
    cache: str | Path | None = None,
    device: str = "auto",
    neighbors: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    metadata: str | Path | None = None,
) -> list[Prediction]:
    """`skincache predict`'s one call: a head run's predictions (`predict_images`), a
    finetune run's (its final checkpoint; no neighbours), and with `explain` the overlays
    (`explain_images`)."""
    if explain:
        return explain_images(run, inputs, explain_dir=explain_dir, target_class=target_class,
                              cache=cache, device=device, neighbors=neighbors,
                              batch_size=batch_size, progress=progress, metadata=metadata)
    run = Path(run)
    if read_run(run).kind != "finetune":
        return predict_images(run, inputs, cache=cache, device=device, neighbors=neighbors,
                              batch_size=batch_size, metadata=metadata)
    paths = expand_inputs(inputs)
    if not paths:
        return predict_images(run, inputs)  # its own "no images" line
    return _finetune_predictions(paths, finetune_explainer(run, resolve_device(device),
                                                           maps=False), maps=False)[0]


def explain_images(
    run: str | Path,
    inputs: list[str | Path],
    *,
    explain_dir: str | Path | None = None,
    target_class: str | int | None = None,
    cache: str | Path | None = None,
    device: str = "auto",
    neighbors: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    metadata: str | Path | None = None,
) -> list[Prediction]:
    """`predict_images` plus, for every image predicted, an overlay PNG of its Grad-CAM map for
    `target_class` (a class name or index; None: the predicted class) in `explain_dir`
    (default `<run>/explain/`); `Prediction.overlay` says where it went. A head run's
    predictions are `predict_images`'s own; a finetune run is predicted by its checkpoint
    (no neighbours: it has no cache). `progress`: a progress bar over the overlays."""
    run = Path(run)
    out_dir = Path(explain_dir) if explain_dir is not None else run / EXPLAIN_DIR
    dev = resolve_device(device)
    explainer = run_explainer(run, dev, cache)
    target = explainer.target_index(target_class)
    done: dict[int, tuple[np.ndarray, Saliency]] = {}
    if read_run(run).kind == "finetune":
        paths = expand_inputs(inputs)
        if not paths:
            return predict_images(run, inputs)  # its own "no images" line
        preds, done = _finetune_predictions(paths, explainer)
    else:
        preds = predict_images(run, inputs, cache=cache, device=device, neighbors=neighbors,
                               batch_size=batch_size, loaded=explainer.loaded,
                               metadata=metadata)
    with progress_bar(sum(p.ok for p in preds), "explain", enabled=progress) as advance:
        _write_overlays(preds, done, explainer, target, out_dir, advance)
    return preds


def _write_overlays(preds: list[Prediction], done: dict[int, tuple[np.ndarray, Saliency]],
                    explainer: Explainer, target: int | None, out_dir: Path,
                    advance: Callable[[int], None]) -> None:
    """One overlay per predicted image; `Prediction.overlay` set to its path."""
    taken: set[str] = set()
    for i, pred in enumerate(preds):
        if not pred.ok:
            continue
        if i in done and target is None:
            pixels, sal = done[i]
        else:
            pixels, reason = explainer.pixels(Path(pred.path))
            if pixels is None:  # decoded a moment ago: the file changed under us
                pred.error = reason
                continue
            c = target if target is not None else explainer.classes.index(pred.predicted)
            sal = explainer.saliency(pixels, c)
        cls = explainer.classes[sal.target]
        title = (f"predicted {pred.predicted} (p = {pred.probabilities[pred.predicted]:.3f})"
                 f"\n{explainer.label}")
        if cls != pred.predicted:
            title += f"\nmap: evidence for {cls} (p = {pred.probabilities[cls]:.3f})"
        if RANDOM_INIT in explainer.label:
            title += "\nrandom weights: this map checks the pipeline only, it means nothing"
        path = out_dir / _overlay_name(Path(pred.path), cls, taken)
        pred.overlay = str(write_overlay(pixels.transpose(1, 2, 0), sal.map, title, path, cls))
        advance(1)
