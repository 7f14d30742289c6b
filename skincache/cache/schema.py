"""The cache's schema, stated once: `CacheHeader`, one field per root attribute that encode
writes, each with its metadata (stored as JSON text or not, required of every cache or not,
and its name in the encoding key when it is part of it). The reader's checks, the writer's
attributes, the header checksum and `FeatureCache.encoding_key` all iterate these fields, so
adding a cache attribute is one line here.

The standard library only: `skincache info`, the CLI's warnings and the error types import it
without numpy or h5py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from skincache.errors import SkincacheError

#: 2: a sha256 per dataset (`checksums` attr) and over the attributes (`header_sha256`).
SCHEMA_VERSION = 2
#: Caches written before checksums: still read, with a `CacheWarning`.
OLDEST_READABLE_SCHEMA = 1

#: Root attributes the writer sets itself (not header fields), and which of them every cache
#: must have for the reader (`format`, `complete`, `schema_version` and the checksums are
#: checked on their own, before the rest).
WRITER_ATTRS = ("format", "schema_version", "feature_dtype", "split_order", "complete",
                "checksums", "header_sha256")
WRITER_REQUIRED = ("split_order", "feature_dtype")


class CacheError(SkincacheError, RuntimeError):
    """A cache that cannot be used as asked; the message names the file and the reason."""


class CacheBusyError(CacheError):
    """Another process holds the cache's lock."""


class CacheWarning(UserWarning):
    """A cache that is still read but deserves a word (an old schema without checksums)."""


def first_line(e: BaseException) -> str:
    """An exception's first line (its type name when it has no text), for one-line errors."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def cache_key(parts: dict) -> str:
    """sha256 of the canonical JSON of everything that changes the cached numbers."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_name(dataset: str, model_slug: str, k: int, key: str) -> str:
    """The cache's file stem: readable parts, then the key's first 12 hex digits."""
    return f"{dataset}__{model_slug}__k{k}__{key[:12]}"


def attr(*, json: bool = False, required: bool = False, encoding: str = "",
         default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A `CacheHeader` field and its metadata: `json` (stored as JSON text, held decoded),
    `required` (the reader refuses a cache without it: old caches lack the others, which
    take their default), `encoding` (its name in the encoding key: a field that changes what
    the features mean, whichever images they are of)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"json": json, "required": required, "encoding": encoding})


class ModelRef(NamedTuple):
    """Which weights a cache was encoded with, as `models.ModelSpec` takes them
    (`ModelSpec(*header.model_spec())`): the cache sits below the model layer and does not
    import it."""

    name: str
    pretrained: str | None
    checkpoint: str | None


@dataclass(kw_only=True)
class CacheHeader:
    """The root attributes `encode` writes and `summary` reads back: their names and kinds
    live here, once (see `attr`). JSON-valued attributes are held decoded. (`write_cache`
    adds the `WRITER_ATTRS` itself.) A field added here is written, read back, covered by
    the header checksum and, when it has an `encoding` name, part of the encoding key."""

    key: str = attr(required=True)
    model: str = attr(required=True)
    weights_sha256: str = attr(required=True, encoding="weights")
    embed_dim: int = attr(required=True)
    logit_scale: float = attr(required=True)
    precision: str = attr(required=True, encoding="precision")
    preprocess: dict = attr(json=True, required=True, encoding="preprocess")
    views: dict = attr(json=True, required=True)
    dataset: str = attr(required=True)
    dataset_kind: str = attr(required=True)
    dataset_root: str = attr(required=True)
    dataset_fingerprint: str = attr(required=True)
    classes: list = attr(json=True, required=True, encoding="classes")
    class_names: list = attr(json=True, required=True)
    versions: dict = attr(json=True, required=True)
    #: when encode ran (not covered by the header checksum: it says nothing of the numbers)
    created: str = attr(required=True, default="")
    template_sets: dict = attr(json=True, default_factory=dict)
    skincache_version: str = attr(default="")
    pretrained: str = attr(default="")
    checkpoint: str = attr(default="")
    checkpoint_sha256: str = attr(default="")
    device: str = attr(default="")
    features_normalized: bool = attr(default=False)
    chunking: dict = attr(json=True, default_factory=dict)
    #: where the splits came from when not the seed or the source (`Dataset.split_origin`:
    #: a split file and its sha256, how many lesion mates --drop-lesion-mates left out)
    split_origin: dict = attr(json=True, default_factory=dict)
    #: the dimension of `features_pre` / `views_pre` (encode --pre-projection: each view's
    #: pooled output before the image tower's final projection); 0: the cache has none
    pre_projection_dim: int = attr(default=0)
    #: the concept list encoded into `/concepts/` (name, sha256, count, file); {}: none
    concepts: dict = attr(json=True, default_factory=dict)

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        """The schema: every attribute with its metadata."""
        return dataclasses.fields(cls)

    @classmethod
    def required_attrs(cls) -> tuple[str, ...]:
        """What every readable cache has (header fields, then the writer's)."""
        return tuple(f.name for f in cls.fields() if f.metadata["required"]) + WRITER_REQUIRED

    @classmethod
    def json_attrs(cls) -> tuple[str, ...]:
        """The attributes stored as JSON text (plus the writer's `split_order`)."""
        return tuple(f.name for f in cls.fields() if f.metadata["json"])

    @classmethod
    def encoding_key_of(cls, attrs: dict) -> str:
        """The encoding key of a cache's attributes as stored (JSON ones as their text, as
        ever, so the keys recorded in existing run folders still match)."""
        return cache_key({f.metadata["encoding"]: attrs[f.name] for f in cls.fields()
                          if f.metadata["encoding"]})

    def to_attrs(self) -> dict:
        """The attributes as the writer stores them (JSON-valued ones encoded)."""
        return {f.name: json.dumps(getattr(self, f.name)) if f.metadata["json"]
                else getattr(self, f.name) for f in self.fields()}

    @classmethod
    def from_attrs(cls, attrs: dict) -> CacheHeader:
        """From a cache's (checked) attributes; ones an older cache lacks take the defaults."""
        values = {}
        for f in cls.fields():
            if f.name in attrs:
                v = attrs[f.name]
                values[f.name] = json.loads(v) if f.metadata["json"] and isinstance(v, str) \
                    else v
        return cls(**values)

    def model_spec(self) -> ModelRef:
        """The weights to load to encode new images as this cache was (predict)."""
        return ModelRef(self.model, self.pretrained or None, self.checkpoint or None)
