"""Decoding and views: both fast routes match open_clip's own preprocess; odd inputs are
converted or refused with a reason; augmentation is seeded by image id."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from skincache.views import (
    DecodeError,
    Normalizer,
    ViewMaker,
    ViewPolicy,
    decode_image,
    view_params,
)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _cosines(model, maker: ViewMaker, files: list[Path]) -> tuple[list[float], list[float]]:
    """Clean-view cosine of (Pillow route, tensor route) against open_clip's preprocess."""
    ref_tf = model.preprocess.open_clip_transform()
    pil_cos, tensor_cos = [], []
    with torch.no_grad():
        for f in files:
            data = f.read_bytes()
            ref = model.model.encode_image(ref_tf(Image.open(f))[None])
            a = torch.from_numpy(maker.from_pil(decode_image(data, maker.draft_shortest()),
                                                f.stem))
            b = maker.from_tensor(decode_jpeg(torch.frombuffer(bytearray(data),
                                                               dtype=torch.uint8)), f.stem)
            fa = model.model.encode_image(Normalizer(model.preprocess, a.device)(a[:1]))
            fb = model.model.encode_image(Normalizer(model.preprocess, b.device)(b[:1]))
            pil_cos.append(torch.cosine_similarity(fa, ref).item())
            tensor_cos.append(torch.cosine_similarity(fb, ref).item())
    return pil_cos, tensor_cos


def test_fast_routes_match_open_clip_preprocess_on_synthetic_600x450(tiny_model, demo_root):
    maker = ViewMaker(tiny_model.preprocess, ViewPolicy(k=2))
    files = sorted(demo_root.rglob("*.jpg"))[:16]
    assert Image.open(files[0]).size == (600, 450)
    pil_cos, tensor_cos = _cosines(tiny_model, maker, files)
    assert min(pil_cos) >= 0.99, pil_cos
    assert min(tensor_cos) >= 0.99, tensor_cos


def test_fast_routes_match_open_clip_preprocess_on_real_ham10000(tiny_model, ham10000_dir):
    root = ham10000_dir
    files = sorted((root / "images").glob("*.jpg"))[:24]
    maker = ViewMaker(tiny_model.preprocess, ViewPolicy(k=0))
    pil_cos, tensor_cos = _cosines(tiny_model, maker, files)
    assert min(pil_cos) >= 0.99, pil_cos
    assert min(tensor_cos) >= 0.99, tensor_cos


def test_draft_mode_shrinks_large_jpegs_but_not_below_need():
    data = _jpeg(np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8))
    img = decode_image(data, draft_shortest=100)
    assert min(img.size) >= 100 and img.size[0] < 1200  # decoded at a reduced DCT scale
    assert decode_image(data).size == (1200, 900)


def test_views_shapes_and_routes_agree(tiny_model):
    policy = ViewPolicy(k=3, seed=7)
    maker = ViewMaker(tiny_model.preprocess, policy)
    arr = np.random.default_rng(1).integers(0, 255, (450, 600, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    a = maker.from_pil(img, "ISIC_1")
    b = maker.from_tensor(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), "ISIC_1")
    assert a.shape == (4, 3, 64, 64) and a.dtype == np.uint8
    assert tuple(b.shape) == a.shape
    # same crops and flips on both routes: only resampling rounding differs
    assert np.abs(a.astype(int) - b.numpy().astype(int)).mean() < 3.0


def test_view_params_are_seeded_by_image_id_and_seed():
    p = ViewPolicy(k=8, seed=0)
    a = view_params("ISIC_1", p, (73, 97), (64, 64))
    assert a == view_params("ISIC_1", p, (73, 97), (64, 64))
    assert a != view_params("ISIC_2", p, (73, 97), (64, 64))
    assert a != view_params("ISIC_1", ViewPolicy(k=8, seed=1), (73, 97), (64, 64))
    for top, left, _ in a:
        assert 0 <= top <= 73 - 64 and 0 <= left <= 97 - 64
    flips = [f for i in range(200) for *_, f in view_params(f"x{i}", p, (73, 97), (64, 64))]
    assert 0.4 < np.mean(flips) < 0.6
    assert not any(f for *_, f in view_params("x", ViewPolicy(k=8, hflip=0.0), (73, 97),
                                              (64, 64)))


def test_view_policy_scales_to_model_size_and_validates():
    assert ViewPolicy().scaled((224, 224)) == (256, (224, 224))
    assert ViewPolicy().scaled((64, 64)) == (73, (64, 64))
    with pytest.raises(ValueError, match="K must be"):
        ViewPolicy(k=-1)
    with pytest.raises(ValueError, match="resize"):
        ViewPolicy(resize=100, crop=224)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (_jpeg(RGB)[:200], "truncated"),
        (b"\xff\xd8\xff" + bytes(range(256)) * 8, "corrupt"),
        (b"lesion_id,image_id\nHAM_1,ISIC_1\n", "not an image"),
        (_png_header_only(40000, 40000), "image too large"),
    ],
    ids=["zero-byte", "truncated", "corrupt", "not-an-image", "bomb"],
)
def test_bad_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _save(Image.fromarray(RGB).convert("L"), "PNG"),
        lambda: _save(Image.fromarray(RGB).convert("RGBA"), "PNG"),
        lambda: _save(Image.fromarray(RGB).convert("CMYK"), "JPEG"),
        lambda: _save(Image.fromarray(RGB).convert("P"), "PNG"),
        lambda: _save(Image.fromarray(RGB[..., 0].astype(np.uint16) * 257),
                      "PNG"),
        lambda: _save(Image.fromarray(RGB).convert("L"), "JPEG"),
    ],
    ids=["grayscale", "rgba", "cmyk", "palette", "16-bit", "grayscale-jpeg"],
)
def test_odd_modes_decode_to_rgb(make):
    img = decode_image(make())
    assert img.mode == "RGB" and img.size == (80, 60)
    arr = np.asarray(img)
    assert arr.std() > 10  # content survived the conversion (not a flat or clipped image)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    img = decode_image(_save(Image.fromarray(ramp), "PNG"))
    arr = np.asarray(img)[..., 0]
    assert arr.min() == 0 and arr.max() == 255 and len(np.unique(arr)) > 200


def test_batched_tensor_views_equal_per_image_views(tiny_model):
    maker = ViewMaker(tiny_model.preprocess, ViewPolicy(k=3, seed=3))
    imgs = torch.from_numpy(np.random.default_rng(5).integers(0, 255, (4, 3, 150, 200),
                                                              dtype=np.uint8))
    ids = [f"ISIC_{i}" for i in range(4)]
    batched = maker.from_tensor_batch(imgs, ids)
    assert batched.shape == (4, 4, 3, 64, 64)
    for i in range(4):
        assert torch.equal(batched[i], maker.from_tensor(imgs[i], ids[i]))
