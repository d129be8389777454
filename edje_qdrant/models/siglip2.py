"""``siglip2-l16-384-edje`` preset: SigLIP2 ViT-L/16 @ 384 towers + the official EDJE reranker.

Vision: ``google/siglip2-large-patch16-384`` (SigLIP architecture in transformers); global vector = the pooled
(attention-head) image embedding, patch tokens = the vision model's last hidden state (576 x 1024); preprocessing
as the SigLIP2 processor (resize to 384 x 384 bilinear, x/255, normalise with mean 0.5 / std 0.5). Text: the SigLIP2
text tower, padded to 64 tokens. Reranker: the official checkpoint (hub ``shahafw/edje-vl-image-retrieval-reranker``)
through ``official.load_official_reranker``; its SigLIP copies (``clip.*``, ``vision_encoder.*``) are used for the
towers when present. Online only for the real weights; every hub failure is a ``ModelError`` naming what was looked
for.

A local directory can build the same preset offline: ``config.json`` with ``"preset": "siglip2-l16-384-edje"``, a
``"siglip"`` section (a ``SiglipConfig`` dict: small random towers, seeded by ``"seed"``), ``"text_tokenizer"``
(a tokenizer directory, or ``"bert-uncased"`` for the bundled WordPiece vocab) and optionally ``"reranker"``
(+ weights.safetensors, see ``registry``); without it the reranker comes from ``"checkpoint"`` (official
checkpoint path or hub id, default the official hub repo) with ``"official_config"`` (heads etc., see
``official.reranker_config_from_official``).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tokenizers import Tokenizer

from edje_qdrant.errors import CheckpointKeyError, ModelError
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.official import OFFICIAL_HUB_REPO, OfficialCheckpoint, load_official_reranker
from edje_qdrant.models.preset import Preset, PresetSpec, build_reranker
from edje_qdrant.models.seeded_init import seeded_init_
from edje_qdrant.models.tokenization import bert_text_tokenizer

log = logging.getLogger(__name__)

NAME = "siglip2-l16-384-edje"
SIGLIP_REPO = "google/siglip2-large-patch16-384"
TEXT_LENGTH = 64


class SiglipVisionTower(nn.Module):
    """SigLIP vision model: (L2-normalised pooled embedding, last hidden state patch tokens)."""

    def __init__(self, vision_model: nn.Module, image_size: int, patch_model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = vision_model
        self.patch_model = patch_model  # the checkpoint's own vision_encoder when it differs from clip's
        self.image_size = int(image_size)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return np.ascontiguousarray((arr - 0.5) / 0.5, dtype=np.float32)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixels)
        glob = F.normalize(out.pooler_output.float(), dim=-1)
        if self.patch_model is None:
            return glob, out.last_hidden_state
        return glob, self.patch_model(pixel_values=pixels).last_hidden_state


class SiglipTextTower(nn.Module):
    """SigLIP text model over lower-cased text padded to 64 tokens; L2-normalised pooled embedding."""

    def __init__(self, text_model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = text_model
        self._tok = tokenizer  # a transformers tokenizer, or a tokenizers.Tokenizer (offline test towers)

    def _ids(self, texts: list[str]) -> torch.Tensor:
        if isinstance(self._tok, Tokenizer):
            ids = [e.ids[:TEXT_LENGTH] + [0] * (TEXT_LENGTH - len(e.ids[:TEXT_LENGTH]))
                   for e in self._tok.encode_batch(texts)]
            return torch.tensor(ids, dtype=torch.long)
        texts = [t.lower() for t in texts]  # SigLIP2 was trained on lower-cased text
        enc = self._tok(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
        return enc["input_ids"]

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids = self._ids(list(texts)).to(next(self.model.parameters()).device)
        return F.normalize(self.model(input_ids=ids).pooler_output.float(), dim=-1)


def _hub_error(what: str, exc: Exception) -> ModelError:
    return ModelError(f"{NAME}: cannot load {what} ({type(exc).__name__}: {exc}). It needs the Hugging Face hub "
                      "(or its local cache); offline, use a local model directory with a config")


def _load_siglip_from_hub() -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer, SiglipModel  # cost: transformers' SigLIP classes

    try:
        model = SiglipModel.from_pretrained(SIGLIP_REPO)
    except Exception as exc:
        raise _hub_error(f"SigLIP2 weights {SIGLIP_REPO!r}", exc) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(SIGLIP_REPO)
    except Exception as exc:
        raise _hub_error(f"the SigLIP2 tokenizer of {SIGLIP_REPO!r}", exc) from exc
    return model, tokenizer


def _build_small_siglip(spec: PresetSpec) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel  # cost: transformers' SigLIP classes

    try:
        cfg = SiglipConfig(**spec.config["siglip"])
        model = seeded_init_(SiglipModel(cfg), int(spec.config.get("seed", 0)), std=0.05)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{spec.directory}/config.json: bad \"siglip\" section ({exc})") from exc
    tok_src = spec.config.get("text_tokenizer", "bert-uncased")
    if tok_src == "bert-uncased":
        tokenizer: Any = bert_text_tokenizer(max_length=TEXT_LENGTH)
    else:
        path = spec.directory / tok_src if spec.directory else tok_src
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ModelError(f"{spec.directory}/config.json: text_tokenizer {tok_src!r} cannot be loaded ({exc})"
                             ) from exc
    return model, tokenizer


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    want = module.state_dict()
    if sd and all(f"vision_model.{k}" in want for k in sd):  # transformers 4.x nests the vision transformer
        sd = {f"vision_model.{k}": v for k, v in sd.items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [k for k in sd if k in want and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointKeyError(f"{what}: missing {missing[:20]}, unexpected {unexpected[:20]}, "
                                 f"shape mismatches {shapes[:20]}")
    module.load_state_dict({k: v.float() for k, v in sd.items()})


def _load_official_towers(siglip: nn.Module, ckpt: OfficialCheckpoint) -> nn.Module | None:
    """Load the checkpoint's SigLIP copies into the towers; returns its own vision encoder when it differs from the
    dual encoder's (else None: one forward gives both outputs)."""
    if ckpt.clip:
        _load_strict(siglip, ckpt.clip, f"{ckpt.source}: clip.* (SigLIP dual encoder)")
    if not ckpt.vision_encoder:
        return None
    from transformers import SiglipVisionModel  # cost: transformers' SigLIP classes, only for this checkpoint

    patch_model = SiglipVisionModel(siglip.config.vision_config)
    _load_strict(patch_model, ckpt.vision_encoder, f"{ckpt.source}: vision_encoder.*")
    a, b = patch_model.state_dict(), siglip.vision_model.state_dict()
    if set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a):
        return None  # identical copy
    return patch_model


def build(spec: PresetSpec) -> EdjeModel:
    """Factory: small random towers from a directory's ``siglip`` config, else the real hub models; the reranker
    of the folder's ``"reranker"`` section, else the official checkpoint (whose SigLIP copies then set the towers)."""
    if "siglip" in spec.config:
        siglip, tokenizer = _build_small_siglip(spec)
    else:
        siglip, tokenizer = _load_siglip_from_hub()
    patch_model = None
    if spec.reranker_section is not None:
        reranker = build_reranker(spec)
    else:
        reranker, ckpt = load_official_reranker(spec.config.get("checkpoint", OFFICIAL_HUB_REPO),
                                                spec.config.get("official_config"))
        patch_model = _load_official_towers(siglip, ckpt)
    vcfg = siglip.config.vision_config
    if reranker.config.vision_width != vcfg.hidden_size:
        raise ModelError(f"{NAME}: reranker expects vision width {reranker.config.vision_width}, the SigLIP "
                         f"vision tower gives {vcfg.hidden_size}")
    vision = SiglipVisionTower(siglip.vision_model, vcfg.image_size, patch_model).eval()
    text = SiglipTextTower(siglip.text_model, tokenizer).eval()
    clip_dim = int(vcfg.hidden_size)  # the pooled image embedding's width
    text_dim = int(getattr(siglip.config.text_config, "projection_size", None) or siglip.config.text_config.hidden_size)
    if text_dim != clip_dim:
        raise ModelError(f"{NAME}: text embedding width {text_dim} differs from image embedding width {clip_dim}")
    return EdjeModel(name=NAME, vision=vision, text=text, reranker=reranker.eval(), clip_dim=clip_dim,
                     fingerprint="", image_batch_size=16)


PRESET = Preset(NAME, build)
