"""Training losses and hard-negative mining on tiny batches."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edje_qdrant.train.losses import (clip_loss, listwise_itm_loss, mask_tokens, mine_hard_negatives, mlm_loss,
                                      negative_mask, sample_hard_negatives, text_recovery_loss)


def test_clip_loss_prefers_matching_pairs():
    e = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(math.log(20.0))
    good = clip_loss(e, e, scale)
    shuffled = clip_loss(e, e[torch.roll(torch.arange(8), 1)], scale)
    assert good < shuffled
    assert good < math.log(8)


def test_negative_mask_excludes_same_image_and_identical_captions():
    # captions 0 and 1 belong to image 10; image 11 carries a caption identical (case/space-insensitive) to 0
    captions = ["A dog runs .", "a brown dog", "two kids play"]
    caption_image = torch.tensor([10, 10, 12])
    image_ids = torch.tensor([10, 11, 12, 10])  # image 10 appears twice in the batch
    image_captions = [{"A dog runs ."}, {" a dog runs ."}, {"two kids play"}, {"A dog runs ."}]
    allowed = negative_mask(caption_image, image_ids, captions, image_captions)
    assert allowed.tolist() == [
        [False, False, True, False],  # own image (both copies) and identical caption of image 11 excluded
        [False, True, True, False],
        [True, True, False, True],
    ]


def test_mining_picks_hardest_allowed():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.7, 0.6, 0.3]])
    allowed = torch.tensor([[False, True, True, True], [True, False, True, True]])
    idx = mine_hard_negatives(sim, allowed, 2)
    assert idx.tolist() == [[1, 3], [2, 3]]


def test_mining_with_too_few_negatives_repeats_and_never_picks_excluded():
    sim = torch.tensor([[0.9, 0.8, 0.1]])
    allowed = torch.tensor([[False, False, True]])
    assert mine_hard_negatives(sim, allowed, 3).tolist() == [[2, 2, 2]]
    with pytest.raises(ValueError):
        mine_hard_negatives(sim, torch.zeros_like(allowed), 1)


def test_listwise_itm_loss_positive_first():
    scores = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    per = F.cross_entropy(scores, torch.zeros(2, dtype=torch.long), reduction="none")
    assert torch.isclose(listwise_itm_loss(scores), per.mean())
    assert per[0] < per[1]


def test_mask_tokens_only_masks_words():
    ids = torch.tensor([[101, 2000, 2001, 2002, 2003, 102, 30522, 102, 0]])
    special = torch.tensor([[True, False, False, False, False, True, True, True, True]])
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, special, 103, 0.5, g)
    changed = masked != ids
    assert not changed[special].any()
    assert changed.any()
    assert torch.equal(labels[changed], ids[changed]) and (labels[~changed] == -100).all()
    # probability 0 still masks one word per row
    masked0, labels0 = mask_tokens(ids, special, 103, 0.0, g)
    assert int((masked0 == 103).sum()) == 1


def test_mlm_and_recovery_losses():
    logits = torch.full((1, 3, 5), -10.0)
    logits[0, 1, 2] = 10.0
    labels = torch.tensor([[-100, 2, -100]])
    assert mlm_loss(logits, labels) < 1e-3
    a = F.normalize(torch.randn(4, 8), dim=-1)
    assert text_recovery_loss(a, a) < 1e-6
    assert torch.isclose(text_recovery_loss(a, -a), torch.tensor(2.0))


def test_sampled_negatives_come_from_the_hardest_pool_and_never_excluded():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]]).expand(50, -1)
    allowed = torch.ones_like(sim, dtype=torch.bool)
    allowed[:, 1] = False
    g = torch.Generator().manual_seed(0)
    idx = sample_hard_negatives(sim, allowed, 2, 4, g)
    assert set(idx.flatten().tolist()) == {0, 2, 3, 4}  # pool of 4 hardest allowed: 0, 2, 3, 4
    assert all(len(set(row)) == 2 for row in idx.tolist())  # drawn without replacement
    assert torch.equal(sample_hard_negatives(sim, allowed, 2, 2, g), mine_hard_negatives(sim, allowed, 2))


def _miner_data():
    from edje_qdrant.train.data import CaptionSet

    # image 0: "A dog runs ." / "a black dog"; image 1 shares the caption "a dog runs ." (identical once
    # normalised); image 2 / 3 are unrelated
    captions = ["A dog runs .", "a black dog", " a dog runs .", "a white dog", "two kids", "a red car"]
    return CaptionSet(images=["i0", "i1", "i2", "i3"], caption_image=[0, 0, 1, 1, 2, 3], captions=captions)


def test_global_mining_excludes_own_image_and_identical_captions():
    from edje_qdrant.train.edje import NegativeMiner

    data = _miner_data()
    miner = NegativeMiner(data)
    # first-stage embeddings where everything is equally similar: mining must rely on the exclusions only
    first_text = F.normalize(torch.ones(6, 4), dim=-1)
    first_image = F.normalize(torch.ones(4, 4), dim=-1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        groups = miner.global_pool([0], [0], first_text, first_image, 2, 2, 3, g)
        (c, imgs), = groups.t2i
        assert groups.captions[c] == 0 and groups.images[imgs[0]] == 0
        negs = {groups.images[i] for i in imgs[1:]}
        assert negs <= {2, 3}  # not image 0 (own) nor image 1 (holds an identical caption)
        (i, caps), = groups.i2t
        assert groups.images[i] == 0 and groups.captions[caps[0]] == 0
        neg_caps = {groups.captions[c] for c in caps[1:]}
        assert neg_caps <= {3, 4, 5}  # not captions of image 0, nor caption 2 (identical text)
    assert groups.anchors == [(0, 0)]


def test_global_mining_prefers_first_stage_hard_negatives():
    from edje_qdrant.train.edje import NegativeMiner

    data = _miner_data()
    first_image = torch.eye(4)
    first_text = torch.tensor([[1.0, 0.0, 0.2, 0.9], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                            [0.5, 0, 0, 1]])
    groups = NegativeMiner(data).global_pool([0], [0], first_text, first_image, 1, 1, 0)
    (_, imgs), = groups.t2i
    assert groups.images[imgs[1]] == 3  # the most similar allowed image for caption 0
    (_, caps), = groups.i2t
    assert groups.captions[caps[1]] == 5  # the most similar allowed caption for image 0


def test_in_batch_mining_groups_cover_the_batch():
    from edje_qdrant.train.edje import NegativeMiner

    data = _miner_data()
    fs = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    groups = NegativeMiner(data).in_batch([0, 2, 3], [1, 4, 5], fs, fs, 2, 2, 0)
    assert groups.images == [0, 2, 3] and groups.captions == [1, 4, 5]
    assert [imgs[0] for _, imgs in groups.t2i] == [0, 1, 2]
    assert all(r not in imgs[1:] for r, imgs in groups.t2i)
