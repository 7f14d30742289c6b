"""`ImageEncoder`: pixels in, features out, the same way for every command.

`encode` (the cache), `predict` (new images) and the benchmarks run images through it, so a
feature means the same thing wherever it was computed: the model's own preprocessing (as a
view recipe and a normaliser on the device), the precision's autocast, and the device's own
loader (`loaders`). Text prompts go through the same model.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from skincache.concepts import ConceptList
from skincache.data import Record
from skincache.device import autocast_dtype, default_workers
from skincache.loaders import Batch, cpu_batches, route, tensor_batches
from skincache.models import LoadedModel
from skincache.prompts import class_prompts
from skincache.views import Normalizer, ViewMaker, ViewPolicy


@torch.no_grad()
def encode_class_prompts(loaded: LoadedModel, classes: list[str], template_set: str,
                         device: torch.device | str) -> np.ndarray:
    """float32 [C, T, D] embeddings (fp32, not normalised) of one template set's prompts for
    every class, in one batch through the text tower: the one prompt encoder, so the cache's
    text (`encode`) and the fine-tune's zero-shot start are the same numbers."""
    prompts = class_prompts(classes, template_set)
    flat = [p for per_class in prompts for p in per_class]
    f = loaded.encode_text(flat, device)
    return f.cpu().numpy().reshape(len(classes), len(prompts[0]), -1)


class PreProjection:
    """The image tower cut before its final projection: `pooled(x)` is the pooled output the
    projection takes (what the CLIP paper's linear probes and ProLIP fit on), `project(p)`
    the rest of the tower, so `project(pooled(x))` is `encode_image(x)` exactly, and both come
    from one pass. Towers: open_clip's ViT (the pooled token before `visual.proj`) and timm
    towers (the trunk's pooled output before `visual.head`). Any other tower (the ResNets,
    whose attention pool holds the projection) is refused with one line by `of`."""

    def __init__(self, visual: torch.nn.Module, kind: str, dim: int):
        self.visual, self.kind, self.dim = visual, kind, dim

    @classmethod
    def of(cls, model: torch.nn.Module, name: str) -> PreProjection:
        from skincache.errors import UsageError

        visual = getattr(model, "visual", None)
        proj = getattr(visual, "proj", None)
        if isinstance(proj, torch.Tensor) and proj.ndim == 2:
            return cls(visual, "vit", int(proj.shape[0]))
        head, trunk = getattr(visual, "head", None), getattr(visual, "trunk", None)
        if trunk is not None and isinstance(head, torch.nn.Module) and not any(
                "pool" in n for n, _ in head.named_children()) and any(
                isinstance(m, torch.nn.Linear) for m in head.modules()):
            return cls(visual, "timm", int(trunk.num_features))
        raise UsageError(f"--pre-projection: {name}'s image tower "
                         f"({type(visual).__name__}) has no separate final projection to "
                         "stop before (ViT towers with visual.proj and timm towers with a "
                         "linear head have one); encode without --pre-projection")

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            return self.visual.trunk(x)
        proj = self.visual.proj
        self.visual.proj = None  # the tower's own forward, stopped before its last matmul
        try:
            return self.visual(x)
        finally:
            self.visual.proj = proj

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            return self.visual.head(pooled)
        return pooled @ self.visual.proj


@torch.no_grad()
def encode_concepts(loaded: LoadedModel, concepts: ConceptList, device: torch.device | str
                    ) -> dict[str, np.ndarray]:
    """The `/concepts/` arrays of a concept list: every prompt (template x term of each
    concept) and every reference prompt through the text tower (fp32, not normalised), with
    the texts and the indices that say which concept and template each prompt belongs to."""
    prompts, concept, template, refs = concepts.texts()
    def embed(texts: list[str]) -> np.ndarray:  # in batches: a user's list may be long
        return np.concatenate([loaded.encode_text(texts[i:i + 256], device).float().cpu()
                               .numpy() for i in range(0, len(texts), 256)])

    emb, ref = embed(prompts), embed(refs)
    return {"names": np.array(concepts.names, dtype=str),
            "prompts": np.array(prompts, dtype=str), "prompt_embeddings": emb,
            "prompt_concept": concept, "prompt_template": template,
            "references": np.array(refs, dtype=str), "reference_embeddings": ref}


class ImageEncoder:
    """The loaded model plus the view recipe and device: pixels in, features out.

    `predict` and `finetune` re-use it so that every image reaches the model the same way.
    `pre_projection`: `encode` also returns each view's pooled output before the final
    projection (`PreProjection`; a tower without one is refused here, before any image)."""

    def __init__(self, loaded: LoadedModel, policy: ViewPolicy, device: torch.device,
                 precision: str = "fp32", pre_projection: bool = False):
        self.loaded = loaded
        self.policy = policy
        self.device = device
        self.precision = precision
        self.maker = ViewMaker(loaded.preprocess, policy)
        self.normalize = Normalizer(loaded.preprocess, device)
        self.pre = PreProjection.of(loaded.model, loaded.spec.name) if pre_projection else None

    @property
    def pre_dim(self) -> int:
        """The pre-projection features' dimension (0 without `pre_projection`)."""
        return self.pre.dim if self.pre is not None else 0

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [n, V, 3, H, W] -> (float32 [n, V, D], the pre-projection float32
        [n, V, D_pre] or None), not normalised, from one pass through the tower."""
        n, v = pixels.shape[:2]
        x = pixels.reshape(n * v, *pixels.shape[2:]).to(self.device, non_blocking=True)
        x = self.normalize(x)
        dtype = autocast_dtype(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if self.pre is None:
                f, p = self.loaded.model.encode_image(x), None
            else:
                p = self.pre.pooled(x)
                f = self.pre.project(p)
        def out(t: torch.Tensor) -> np.ndarray:
            return t.float().reshape(n, v, -1).cpu().numpy()

        return out(f), None if p is None else out(p)

    def features(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [n, V, 3, H, W] -> float32 [n, V, D] (not normalised)."""
        return self.encode(pixels)[0]

    def features_pre(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [n, V, 3, H, W] -> the pre-projection float32 [n, V, D_pre]."""
        pre = self.encode(pixels)[1]
        if pre is None:
            raise RuntimeError("internal: features_pre on an encoder without pre_projection")
        return pre

    def text_features(self, classes: list[str], template_set: str) -> np.ndarray:
        """float32 [C, T, D] prompt embeddings (fp32, not normalised)."""
        return encode_class_prompts(self.loaded, classes, template_set, self.device)

    def batches(self, records: list[Record], positions: list[int], batch_size: int,
                num_workers: int | None = None, loader: str = "auto",
                root: str | None = None) -> Iterator[Batch]:
        """The device's own loader: nvjpeg on CUDA, Pillow workers elsewhere. With `root`,
        images reached by a symlink out of that folder are failures (`loaders.link_out_of`)."""
        if route(loader, self.device) == "tensor":
            return tensor_batches(records, positions, self.maker, batch_size, self.device,
                                  root=root)
        workers = default_workers() if num_workers is None else num_workers
        return cpu_batches(records, positions, self.maker, batch_size, workers,
                           pin_memory=self.device.type == "cuda", root=root)
