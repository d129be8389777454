"""Training of the offline preset: ``train_first_stage`` (LiT) then ``train_reranker`` (EDJE).

Both read a captions TSV (image, caption_idx, split, caption) and an images folder, cache DINOv2 tokens once
(outside the repository, see ``common.default_cache_folder``) and write resumable checkpoints under ``out``.
"""
from __future__ import annotations

from edje_qdrant.train.first_stage import train_first_stage
from edje_qdrant.train.pipeline import export_preset, train_reranker

__all__ = ["train_first_stage", "train_reranker", "export_preset"]
