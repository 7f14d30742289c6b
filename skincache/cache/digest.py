"""The checksums of a cache: a sha256 per dataset, of its values as stored, and one over the
attributes (`header_sha256`). Streaming variants hash a dataset block by block with the same
result, so a large split is verified without a second copy in memory.

numpy and hashlib only; the reader and the writer both use these, so what is written is what
is checked."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np


#: rows per block when streaming a dataset (hashing, batches): about 32 MB of float16 at D=512
def _block_rows(row_bytes: int, target: int = 32 << 20) -> int:
    return max(1, target // max(1, row_bytes))


def _decode_attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _strs(ds) -> np.ndarray:
    """A string dataset's values as h5py decodes them (the writer's own, just-written file)."""
    return np.array(ds.asstr()[()], dtype=object) if len(ds) else np.array([], dtype=object)



def _digest(value) -> str:
    """sha256 of a dataset's values as stored: dtype, shape and raw bytes for numbers;
    length-prefixed UTF-8 for strings (what h5py gives back is re-encoded the same way)."""
    h = hashlib.sha256()
    a = np.asarray(value)
    if a.dtype.kind in "OUS":
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in a.reshape(-1)]
        data = [x.encode("utf-8") for x in items]
        h.update(f"str{a.shape}".encode())
        h.update(np.array([len(b) for b in data], dtype="<u8").tobytes())
        h.update(b"".join(data))
    else:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def dataset_digest(value) -> str:
    """The sha256 `write_cache` stores for each dataset and `FeatureCache.open` verifies
    (public so the checksum benchmark times exactly it)."""
    return _digest(value)


def _digest_start(a: np.ndarray, shape: tuple | None = None):
    """A streaming `_digest` of a numeric array: the header now, rows via `_digest_update`
    (row blocks of a C-contiguous array are its byte stream, so the digest is the same)."""
    h = hashlib.sha256()
    dt = a.dtype.newbyteorder("<")
    h.update(f"{dt.str}{tuple(a.shape if shape is None else shape)}".encode())
    return h


def _digest_update(h, block: np.ndarray) -> None:
    b = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    h.update(b.reshape(-1).view(np.uint8))


def _row_blocks(ds, rows: int | None = None) -> Iterator[tuple[int, int]]:
    n = ds.shape[0] if ds.ndim else 0
    if not ds.ndim:
        yield 0, 0
        return
    step = rows or _block_rows(int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    for start in range(0, n, step):
        yield start, min(n, start + step)
    if n == 0:
        yield 0, 0


def _header_digest(raw: dict) -> str:
    """sha256 of every attribute but `header_sha256` itself and `created` (a timestamp that
    says nothing about the numbers: two identical runs get identical checksums), as
    canonical JSON."""
    canon = {k: _decode_attr(v) for k, v in raw.items() if k not in ("header_sha256",
                                                                      "created")}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


