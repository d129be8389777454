"""Starting points of a split reranker for training: joint layers from MiniLM, the pool adapter from the first
stage's heads."""
from __future__ import annotations

import torch

from edje_qdrant.errors import ModelError
from edje_qdrant.models import minilm
from edje_qdrant.models.split_joint import PoolAdapter, SplitJointReranker


def init_joint_from_minilm(model: SplitJointReranker) -> None:
    """Joint layer i starts as MiniLM layer ``text_layers + i`` (when MiniLM has it)."""
    full = minilm.load_bert()
    for i, layer in enumerate(model.joint):
        j = model.config.text_layers + i
        if j < len(full.encoder.layer):
            layer.load_from_bert_layer(full.encoder.layer[j])


def init_adapter_from_first_stage(model: SplitJointReranker, image_head: torch.Tensor, text_proj: torch.Tensor
                                  ) -> None:
    """Pool adapter only: start its projection where the first stage maps a patch into the text space,
    pulled back through the text projection (``pinv(text_proj) @ image_head[:, patch half]``), so image
    cells start next to the word states that describe them. Extra (intermediate) layers start at zero."""
    adapter = model.adapter
    if not isinstance(adapter, PoolAdapter):
        raise ModelError("the first-stage adapter init needs the pool adapter")
    w = torch.linalg.pinv(text_proj.float()) @ image_head.float()[:, image_head.shape[1] // 2:]
    with torch.no_grad():
        adapter.proj.weight.zero_()
        adapter.proj.weight[:, adapter.vision_width - w.shape[1]:] = w  # last layer comes last
        adapter.proj.bias.zero_()
