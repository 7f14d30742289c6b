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

    `predict` and `finetune` re-use it so that every image reaches the model the same way."""

    def __init__(self, loaded: LoadedModel, policy: ViewPolicy, device: torch.device,
                 precision: str = "fp32"):
        self.loaded = loaded
        self.policy = policy
        self.device = device
        self.precision = precision
        self.maker = ViewMaker(loaded.preprocess, policy)
        self.normalize = Normalizer(loaded.preprocess, device)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [n, V, 3, H, W] -> float32 [n, V, D] (not normalised)."""
        n, v = pixels.shape[:2]
        x = pixels.reshape(n * v, *pixels.shape[2:]).to(self.device, non_blocking=True)
        x = self.normalize(x)
        dtype = autocast_dtype(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            f = self.loaded.model.encode_image(x)
        return f.float().reshape(n, v, -1).cpu().numpy()

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
