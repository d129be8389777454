"""The joint encoder's contract: every kind meets ``Reranker``, and a new kind is one class plus one table entry."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pytest
import torch
from torch import nn

from edje_qdrant.errors import ModelError
from edje_qdrant.models import kinds, load_model, model_dir
from edje_qdrant.models.base import ConfigSizes, Reranker
from edje_qdrant.models.int8 import int8_copy


class MeanReranker(ConfigSizes, nn.Module):
    """A third layout, for this test only: m tokens are the patch grid's mean, projected; the score is the dot
    product of a bag of query characters with the mean token."""

    KIND = "mean"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = type("Sizes", (), dict(config))
        self.project = nn.Linear(int(config["vision_width"]), int(config["hidden_size"]))
        self.chars = nn.Linear(128, int(config["hidden_size"]))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, minilm_wheel: Any = None) -> "MeanReranker":
        return cls({k: v for k, v in config.items() if k != "kind"})

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.KIND, "num_tokens": self.num_tokens, "hidden_size": self.token_dim,
                "vision_width": self.project.in_features}

    def compress(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.project(patch_tokens.mean(1, keepdim=True)).expand(-1, self.num_tokens, -1)

    def score(self, query: str | list[str], image_tokens: torch.Tensor) -> torch.Tensor:
        texts = [query] * len(image_tokens) if isinstance(query, str) else list(query)
        bags = torch.zeros(len(texts), 128)
        for row, text in enumerate(texts):
            for ch in text.encode("ascii", "ignore"):
                bags[row, ch] += 1
        return (self.chars(bags) * image_tokens.mean(1)).sum(-1).float()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def optional_weights(self) -> tuple[str, ...]:
        return ()

    def quantize(self) -> nn.Module:
        return int8_copy(self, "chars")


def test_the_bundled_kinds_meet_the_contract(tiny_model):
    for kind in kinds.KINDS:
        cls = kinds.reranker_class(kind)
        assert cls.KIND == kind and hasattr(cls, "from_config")
    reranker = tiny_model.reranker
    assert isinstance(reranker, Reranker) and kinds.kind_of(reranker.to_config()) == "edje"
    rebuilt = kinds.reranker_from_config(reranker.to_config())
    assert type(rebuilt) is type(reranker) and rebuilt.to_config() == reranker.to_config()
    with pytest.raises(ModelError, match="reranker kind 'nope' is not one of 'edje', 'split'"):
        kinds.reranker_from_config({"kind": "nope"}, "m/config.json")


def test_a_new_kind_is_one_class_and_one_table_entry(tmp_path, monkeypatch):
    """A model folder naming the new kind loads through the one loader and runs ingest-side compression, re-ranking
    and the int8 path: model_dir, the preset and EdjeModel read nothing but the table and the contract."""
    monkeypatch.setitem(kinds.KINDS, "mean", f"{__name__}:MeanReranker")
    torch.manual_seed(0)
    mine = MeanReranker({"num_tokens": 4, "hidden_size": 8, "vision_width": 64})
    assert isinstance(mine, Reranker)
    folder = model_dir.write(tmp_path / "m", {"preset": "tiny-random", "reranker": mine.to_config()},
                             {"reranker": mine.trainable_state()}, dtype=None)
    model = load_model(str(folder), device="cpu")
    assert isinstance(model.reranker, MeanReranker) and (model.num_tokens, model.token_dim) == (4, 8)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
    _, tokens = model.embed_images(pixels)
    assert tokens.shape == (2, 4, 8)
    logits = model.rerank("a red square", tokens)
    expected = mine.score("a red square", mine.compress(model.vision.encode(torch.from_numpy(pixels))[1]))
    np.testing.assert_allclose(logits, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    model.precision = "int8"
    assert model.rerank("a red square", tokens).shape == (2,)


def test_the_old_names_of_the_full_joint_layout_still_import_from_the_package():
    """``edje_qdrant.models`` listed them publicly, so code outside this repository may use them."""
    from edje_qdrant.models import EdjeReranker, FullJointConfig, FullJointReranker, RerankerConfig

    assert EdjeReranker is FullJointReranker and RerankerConfig is FullJointConfig
