"""Pair layout of the joint encoder: ids, token types, truncation, <image> replacement, positions, broadcast."""
from __future__ import annotations

import pytest
import torch

from edje_qdrant.errors import InputError
from edje_qdrant.models.full_joint import FullJointReranker, FullJointConfig
from edje_qdrant.models.tokenization import PairTokenizer

CLS, SEP, PAD, IMG = 101, 102, 0, 30522
LONG = " ".join(f"word{i % 7}" if i % 3 else "dog" for i in range(120))  # far more than 61 wordpieces


def small_reranker(m: int = 4, seed: int = 0) -> FullJointReranker:
    torch.manual_seed(seed)
    cfg = FullJointConfig(vision_width=16, vision_heads=2, num_tokens=m, adapter_hidden=32, hidden_size=32,
                          num_layers=2, num_heads=4, intermediate_size=64)
    model = FullJointReranker(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def reranker() -> FullJointReranker:
    return small_reranker()


@pytest.mark.parametrize("m", [1, 8, 64])
def test_layout_and_token_types(m):
    tok = PairTokenizer(m)
    enc = tok.encode("A Dog, running!")
    ids, types, mask = (t[0].tolist() for t in (enc.input_ids, enc.token_type_ids, enc.attention_mask))
    text = ids[1:ids.index(SEP)]
    assert ids == [CLS, *text, SEP, *[IMG] * m, SEP]
    assert tok.tokenize("A Dog, running!")[1:1 + len(text)] == ["a", "dog", ",", "running", "!"]
    assert types == [0] * (len(text) + 2) + [1] * (m + 1)
    assert mask == [1] * len(ids)


@pytest.mark.parametrize("m", [1, 8, 64, 100])
def test_truncation_keeps_61_wordpieces_for_any_m(m):
    tok = PairTokenizer(m)
    ids = tok.encode(LONG).input_ids[0].tolist()
    assert len(ids) == 64 + m
    assert ids[62] == SEP and ids[63:] == [IMG] * m + [SEP]
    exact = " ".join(["dog"] * 61)
    assert tok.encode(exact).input_ids.shape[1] == 64 + m
    assert tok.encode(exact + " dog").input_ids[0].tolist() == tok.encode(exact).input_ids[0].tolist()


def test_literal_special_tokens_keep_segment_types():
    tok = PairTokenizer(3)
    enc = tok.encode("a [SEP] b [MASK]")
    ids, types = enc.input_ids[0].tolist(), enc.token_type_ids[0].tolist()
    assert ids[:6] == [CLS, 1037, SEP, 1038, 103, SEP]
    assert types[:6] == [0] * 6 and types[6:] == [1] * 4


def test_padding_right_to_longest_real_sequence():
    tok = PairTokenizer(2)
    enc = tok.encode(["a b c d", "a", ""])
    assert enc.input_ids.shape == (3, 4 + 2 + 3)
    assert enc.input_ids[2].tolist() == [CLS, SEP, IMG, IMG, SEP, PAD, PAD, PAD, PAD]
    assert enc.attention_mask[2].tolist() == [1] * 5 + [0] * 4
    assert enc.token_type_ids[2].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0]


def test_literal_image_text_is_escaped_not_a_crash(reranker):
    tok = reranker.tokenizer
    assert tok.tokenize("a <image> b")[1:6] == ["a", "<", "image", ">", "b"]
    assert tok.encode("a <image> b").input_ids.tolist() == tok.encode("a <IMAGE> b").input_ids.tolist()
    assert int((tok.encode("<image><image>").input_ids == IMG).sum()) == reranker.num_tokens
    tokens = torch.randn(3, reranker.num_tokens, reranker.token_dim)
    with torch.inference_mode():
        logits = reranker.score(["a <image> b", "<image>" * 9, "plain"], tokens)
    assert torch.isfinite(logits).all() and logits.shape == (3,)


def test_image_positions_replaced_in_order(reranker):
    m, d = reranker.num_tokens, reranker.token_dim
    enc = reranker.tokenizer.encode(["short", "a much longer caption here"])
    tokens = torch.randn(2, m, d)
    with torch.no_grad():
        emb = reranker.embed_pairs(enc.input_ids, tokens)
        words = reranker.bert.embeddings.word_embeddings(enc.input_ids)
    for row in range(2):
        pos = (enc.input_ids[row] == IMG).nonzero().flatten()
        assert len(pos) == m and torch.equal(emb[row, pos], tokens[row])
        other = enc.input_ids[row] != IMG
        assert torch.equal(emb[row, other], words[row, other])


def test_bert_adds_positions_over_the_whole_sequence_and_token_types(reranker):
    m, d = reranker.num_tokens, reranker.token_dim
    enc = reranker.tokenizer.encode("a cat")
    tokens = torch.randn(1, m, d)
    seen = {}
    hook = reranker.bert.embeddings.register_forward_hook(lambda mod, args, out: seen.setdefault("x", out))
    try:
        with torch.no_grad():
            reranker.encode(enc.input_ids, enc.token_type_ids, enc.attention_mask, tokens)
            e = reranker.bert.embeddings
            x = reranker.embed_pairs(enc.input_ids, tokens)
            length = x.shape[1]
            manual = e.LayerNorm(x + e.position_embeddings.weight[:length] + e.token_type_embeddings(enc.token_type_ids))
    finally:
        hook.remove()
    assert torch.allclose(seen["x"], manual, atol=1e-6)


def test_broadcast_query_equals_per_caption_path(reranker):
    m, d = reranker.num_tokens, reranker.token_dim
    tokens = torch.randn(6, m, d)
    q = "a red ball on green grass"
    with torch.inference_mode():
        broadcast = reranker.score(q, tokens)
        listed = reranker.score([q] * 6, tokens)
        one_by_one = torch.cat([reranker.score(q, tokens[i:i + 1]) for i in range(6)])
    assert broadcast.shape == (6,) and broadcast.dtype == torch.float32
    assert torch.allclose(broadcast, listed, atol=1e-6)
    assert torch.allclose(broadcast, one_by_one, atol=1e-6)
    assert broadcast.std() > 1e-3  # different images, different scores


def test_padding_does_not_change_scores(reranker):
    m, d = reranker.num_tokens, reranker.token_dim
    tokens = torch.randn(3, m, d)
    caps = ["x", "a longer caption with many words in it", LONG]
    with torch.inference_mode():
        batched = reranker.score(caps, tokens)
        alone = torch.stack([reranker.score(c, tokens[i:i + 1])[0] for i, c in enumerate(caps)])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_head_stays_float32_under_bf16_autocast(reranker):
    m, d = reranker.num_tokens, reranker.token_dim
    tokens = torch.randn(4, m, d)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = reranker.score("query", tokens)
    assert logits.dtype == torch.float32 and logits.shape == (4,)


def test_bad_inputs_raise_input_error(reranker):
    m, d = reranker.num_tokens, reranker.token_dim
    with pytest.raises(InputError, match="2 captions for 3"):
        reranker.score(["a", "b"], torch.randn(3, m, d))
    with pytest.raises(InputError, match=r"image tokens must be"):
        reranker.score("a", torch.randn(3, m + 1, d))
    assert reranker.score("a", torch.randn(0, m, d)).shape == (0,)


def test_forward_trims_fixed_length_padding(reranker):
    m, d = reranker.num_tokens, reranker.token_dim
    enc = reranker.tokenizer.encode(["a dog", "a cat on a mat"])
    extra = 20
    pad = lambda t: torch.cat([t, torch.zeros(t.shape[0], extra, dtype=t.dtype)], dim=1)  # noqa: E731
    tokens = torch.randn(2, m, d)
    with torch.inference_mode():
        want = reranker(enc.input_ids, enc.token_type_ids, enc.attention_mask, tokens)
        logits, hidden = reranker(pad(enc.input_ids), pad(enc.token_type_ids), pad(enc.attention_mask), tokens,
                                  return_hidden=True)
    assert hidden.shape[1] == enc.input_ids.shape[1]
    assert torch.allclose(logits, want, atol=1e-6)
