"""`skincache encode` as one library call: a dataset source read, split, limited and checked,
then encoded into a cache. Torch-free to import: torch and open_clip load only once the
dataset has been read and validated, so a bad `--data` is refused in a second, not after the
model stack has loaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skincache.defaults import CACHE_DIR, SPLIT_RATIOS

if TYPE_CHECKING:
    from skincache.encode import EncodeResult


def encode_source(
    data: str,
    *,
    model: str,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    split_ratios: tuple[float, ...] = SPLIT_RATIOS,
    split_seed: int = 0,
    test: str | None = None,
    split_file: str | Path | None = None,
    drop_lesion_mates: bool = False,
    limit: int | None = None,
    views: int = 4,
    view_seed: int = 0,
    cache_dir: str | Path = CACHE_DIR,
    on_split: Callable[[dict[str, Any]], None] | None = None,
    concepts: str | Path | bool = True,
    **encode_options: Any,
) -> EncodeResult:
    """Load `data` (any source `load_dataset` reads; `test` a second source used whole as
    the test split), take the seeded `limit` subset, validate it, then encode it with
    `model` (`pretrained` resolved as `skincache models` says: openai where the model has
    it). `on_split(split_origin)` is called before the model loads, so a caller can say where
    the splits came from before the progress bar; `encode_options` pass to `encode_dataset`.
    The result's `spec` is the model it was encoded with. `concepts`: a concept list file,
    True (the shipped list) or False (none); a bad file is refused before the data is read.
    """
    from skincache.concepts import load_concepts
    from skincache.data import limit_dataset, load_dataset

    concept_list = load_concepts(concepts) if isinstance(concepts, (str, Path)) else concepts

    ds = limit_dataset(load_dataset(data, split_ratios=split_ratios, seed=split_seed, test=test,
                                    split_file=split_file, drop_lesion_mates=drop_lesion_mates),
                       limit, split_seed)
    ds.validate()
    if on_split is not None:
        on_split(ds.split_origin)
    # torch and open_clip load from here on: the dataset is read and checked
    from skincache.encode import encode_dataset
    from skincache.models import ModelSpec, resolve_pretrained
    from skincache.views import ViewPolicy

    ckpt = str(checkpoint) if checkpoint else None
    spec = ModelSpec(model, resolve_pretrained(model, pretrained, ckpt), ckpt)
    result = encode_dataset(ds, spec, policy=ViewPolicy(k=views, seed=view_seed),
                            cache_dir=cache_dir, concepts=concept_list, **encode_options)
    result.spec = spec
    return result
