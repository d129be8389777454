"""The query-time fast paths give the same answers as the plain paths (benchmarks/ measures what they save)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edje_qdrant.errors import InputError
from edje_qdrant.models import load_model
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.full_joint import trim_padding

QUERY = "a black dog runs across the green grass"
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> EdjeModel:
    return load_model("tiny-random", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def tokens(model: EdjeModel) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.standard_normal((12, model.num_tokens, model.token_dim)) * 0.5).astype(np.float16)


def _fp32(model: EdjeModel) -> EdjeModel:
    return EdjeModel(name=model.name, vision=model.vision, text=model.text, reranker=model.reranker,
                     clip_dim=model.clip_dim, fingerprint=model.fingerprint, precision="fp32")


def test_broadcast_query_equals_per_row_captions(model, tokens):
    r = model.reranker
    t = torch.from_numpy(tokens).float()
    with torch.inference_mode():
        broadcast = r.score(QUERY, t)
        per_row = r.score([QUERY] * len(t), t)
        one_by_one = torch.cat([r.score(QUERY, t[i:i + 1]) for i in range(len(t))])
    assert broadcast.shape == (len(t),)
    assert (broadcast - per_row).abs().max().item() <= ATOL
    assert (broadcast - one_by_one).abs().max().item() <= ATOL
    assert broadcast.std().item() > 100 * ATOL  # the candidates really score differently


def test_cls_only_last_layer_equals_full_forward(model, tokens):
    r = model.reranker
    t = torch.from_numpy(tokens).float()
    enc = r.tokenizer.encode(QUERY)
    with torch.inference_mode():
        full = r.forward(enc.input_ids, enc.token_type_ids, enc.attention_mask, t)
        fast = r.cls_logits(enc.input_ids, enc.token_type_ids, t)
        scored = r.score(QUERY, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full_bf16 = r.forward(enc.input_ids, enc.token_type_ids, enc.attention_mask, t)
            fast_bf16 = r.score(QUERY, t)
    assert (full - fast).abs().max().item() <= ATOL
    assert torch.equal(fast, scored)
    assert fast_bf16.dtype == torch.float32
    assert (full_bf16 - fast_bf16).abs().max().item() <= 0.05 * full.std().item()


def test_padded_captions_take_the_full_path_and_match(model, tokens):
    """Captions of different lengths are padded: score falls back to the masked forward, row by row equal."""
    r = model.reranker
    t = torch.from_numpy(tokens[:3]).float()
    caps = ["dog", "a dog with a very long description of the grass and the sky and the sea", QUERY]
    with torch.inference_mode():
        batched = r.score(caps, t)
        single = torch.cat([r.score(c, t[i:i + 1]) for i, c in enumerate(caps)])
    assert (batched - single).abs().max().item() <= ATOL


def test_trimmed_padding_equals_untrimmed(model, tokens):
    r = model.reranker
    t = torch.from_numpy(tokens[:4]).float()
    enc = r.tokenizer.encode(["dog", QUERY, "two dogs", "a cat on a mat"])
    pad = r.tokenizer.max_length - enc.input_ids.shape[1]
    assert pad > 0
    padded = [torch.nn.functional.pad(x, (0, pad)) for x in (enc.input_ids, enc.token_type_ids, enc.attention_mask)]
    trimmed = trim_padding(*padded)
    assert trimmed[0].shape[1] == enc.input_ids.shape[1]
    with torch.inference_mode():
        untrimmed = r.head_logits(r.encode(*padded, t))
        via_forward = r.forward(*padded, t)  # trims first
    assert (untrimmed - via_forward).abs().max().item() <= ATOL


def test_float16_tokens_are_upcast_on_the_device(model, tokens):
    m = _fp32(model)
    from_fp16 = m.rerank(QUERY, tokens)
    from_fp32 = m.rerank(QUERY, tokens.astype(np.float32))
    assert from_fp16.dtype == np.float32
    np.testing.assert_allclose(from_fp16, from_fp32, atol=ATOL)


def test_bf16_autocast_close_to_fp32(model, tokens):
    ref = _fp32(model).rerank(QUERY, tokens)
    m = _fp32(model)
    m.precision = "bf16"
    got = m.rerank(QUERY, tokens)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 0.1 * ref.std()


def test_int8_within_tolerance_and_original_untouched(model, tokens):
    """int8 dynamic quantization: max |logit dev| <= 0.5 x the fp32 spread, correlation >= 0.98 (tiny model)."""
    ref_model = _fp32(model)
    ref = ref_model.rerank(QUERY, tokens)
    before = {k: v.clone() for k, v in model.reranker.state_dict().items()}
    m = _fp32(model)
    m.precision = "int8"
    got = m.rerank(QUERY, tokens)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 0.5 * ref.std()
    assert np.corrcoef(got, ref)[0, 1] >= 0.98
    assert m.joint_encoder() is m.joint_encoder()  # quantized once, then reused
    after = model.reranker.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_allclose(ref_model.rerank(QUERY, tokens), ref, atol=ATOL)


def test_quantize_int8_quantizes_only_the_encoder(model):
    q = model.reranker.quantize()
    kinds = {type(mod).__module__ for mod in q.bert.encoder.modules() if "Linear" in type(mod).__name__}
    assert kinds and all("quantized" in k for k in kinds)
    assert type(q.head[1]) is torch.nn.Linear  # the head stays float32
    assert type(model.reranker.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear


def test_int8_refuses_a_gpu_device(model, tokens):
    m = EdjeModel(name=model.name, vision=model.vision, text=model.text, reranker=model.reranker,
                  clip_dim=model.clip_dim, fingerprint=model.fingerprint, device=torch.device("cuda"),
                  precision="int8")
    with pytest.raises(InputError, match="int8 runs on the CPU only"):
        m.joint_encoder()


def test_payload_fetched_for_top_k_only_matches_the_one_call_path(tmp_path, demo_folder, tiny_model):
    """rerank_k > k: blobs in the ANN call, page_content/metadata read for the final k; same hits as k == rerank_k."""
    from edje_qdrant.ingestion import ingest
    from edje_qdrant.retriever import Retriever
    from edje_qdrant.store import open_store

    store = open_store(path=str(tmp_path / "store"))
    try:
        assert ingest(demo_folder, store, tiny_model, "images").ingested == 12
        r = Retriever(store, "images", tiny_model)
        timings: dict[str, float] = {}
        slim = r.search("a red circle", k=4, rerank_k=12, timings=timings)
        full = r.search("a red circle", k=12, rerank_k=12)[:4]
        assert "fetch_payload" in timings
        assert [x.to_dict() for x in slim] == [x.to_dict() for x in full]
        assert all(x.path and x.metadata["sha256"] and x.page_content for x in slim)
    finally:
        store.close()


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_canonical_blob_fast_decode_equals_the_msgpack_path(dtype, out_dtype):
    from edje_qdrant import codec

    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 24)).astype(np.float32)
    blob = codec.encode_tokens(x, dtype)
    fast = np.empty((16, 24), out_dtype)
    assert codec.decode_canonical_into(blob, fast)
    slow = codec.decode_tokens(blob, expected_shape=(16, 24)).astype(out_dtype)  # the msgpack path
    assert np.array_equal(fast, slow)
    assert not codec.decode_canonical_into(blob, np.empty((16, 25), out_dtype))  # other shape: the full path decides


def test_non_canonical_records_still_decode_through_msgpack():
    """Same fields in another key order: not the canonical bytes, decoded (and validated) by the full path."""
    import msgpack
    import pybase64

    from edje_qdrant import codec

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    record = {"data": x.astype("<f2").tobytes(), "shape": [3, 4], "dtype": "fp16", "v": 1}
    blob = pybase64.b64encode(msgpack.packb(record, use_bin_type=True)).decode()
    out = np.empty((3, 4), np.float32)
    assert not codec.decode_canonical_into(blob, out)
    codec.decode_into(blob, out)
    assert np.array_equal(out, x)
    truncated = codec.encode_tokens(x)[:-8]
    with pytest.raises(codec.CodecError):
        codec.decode_into(truncated, out)


def test_micro_batched_rerank_equals_single_calls(model, tokens):
    """Requests queued while the model is busy go through one forward; each gets its own logits."""
    import threading
    import time

    from edje_qdrant.microbatch import MicroBatcher

    lock = threading.Lock()
    batcher = MicroBatcher(_fp32(model), lock)
    queries = [QUERY, "two children play football", "a red circle on a white wall with a long shadow"]
    parts = [tokens[:5], tokens[5:6], tokens[6:12]]
    want = [_fp32(model).rerank(q, t) for q, t in zip(queries, parts)]
    got: dict[int, np.ndarray] = {}
    with lock:  # the model is busy: all three calls queue up
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, batcher.rerank(queries[i], parts[i])))
                   for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(batcher.pending) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(batcher.pending) == 3
    for t in threads:
        t.join(10)
    assert (batcher.forwards, batcher.requests) == (1, 3)
    for i in range(3):
        np.testing.assert_allclose(got[i], want[i], atol=ATOL)
    assert np.array_equal(batcher.rerank(QUERY, tokens[:5]), want[0])  # a lone call: its own forward
    assert batcher.forwards == 2


def test_micro_batch_flag_keeps_search_results(tmp_path, demo_folder, tiny_model):
    import threading

    from edje_qdrant.ingestion import ingest
    from edje_qdrant.retriever import Retriever
    from edje_qdrant.store import open_store

    store = open_store(path=str(tmp_path / "store"))
    try:
        ingest(demo_folder, store, tiny_model, "images")
        plain = Retriever(store, "images", tiny_model)
        batched = Retriever(store, "images", tiny_model, micro_batch=True)
        queries = ["a red circle", "a blue square", "a green triangle", "a red circle"]
        want = [[(x.id, x.score) for x in plain.search(q, k=5, rerank_k=12)] for q in queries]
        got: dict[int, list] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(
            i, [(x.id, x.score) for x in batched.search(queries[i], k=5, rerank_k=12)]))
            for i in range(len(queries))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for i in range(len(queries)):
            assert [x[0] for x in got[i]] == [x[0] for x in want[i]]
            np.testing.assert_allclose([x[1] for x in got[i]], [x[1] for x in want[i]], atol=ATOL)
        assert batched._batcher.requests == len(queries)
    finally:
        store.close()
