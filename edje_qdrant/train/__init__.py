"""Training of the offline models: ``train_first_stage`` (LiT), then a reranker on top of it
(``train_reranker``: full-joint EDJE; ``split_run.train_split``: the split reranker), then ``export_model``.

All read a captions TSV (image, caption_idx, split, caption) and an images folder, cache DINOv2 tokens once
(outside the repository, see ``common.default_cache_folder``), run the one training loop (``loop.py``) and write
resumable checkpoints under ``out``.
"""
from edje_qdrant.train.edje_run import train_reranker
from edje_qdrant.train.export import export_model
from edje_qdrant.train.first_stage import train_first_stage

__all__ = ["train_first_stage", "train_reranker", "export_model"]
