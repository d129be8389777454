"""Counterfeit captions: each rule changes exactly what it says, refuses what it must, and the blind prior and
its balancing behave as documented."""
from __future__ import annotations

import random

import pytest

from edje_qdrant.train.attribute_mining import AttributeIndex
from edje_qdrant.train.counterfeit import (CaptionStats, NgramPrior, attributes, balance, binding_pairs,
                                           colour_replaced, colours_swapped, count_changed, counterfeits, gender,
                                           person_swapped, roles_swapped)

TRAIN = [
    "A black dog runs on the grass .", "A brown dog runs on the grass .", "A white dog plays in the snow .",
    "A man in a red shirt rides a bike .", "A woman in a blue shirt rides a bike .",
    "A girl in a yellow dress sits on a green slide .", "A boy on a yellow slide .", "A red hat on a black wall .",
    "A black hat and a red wall .", "Two dogs play .", "Three dogs play .", "Two men walk .", "Three men walk .",
    "A dog chases a boy .", "A boy chases a dog .", "A man in a green shirt .", "A man in a black shirt .",
    "A man in a white shirt .", "A dog in a red collar .", "A dog in a blue collar .",
]


@pytest.fixture(scope="module")
def stats() -> CaptionStats:
    return CaptionStats(TRAIN)


def test_colour_replaced_uses_only_colour_noun_bigrams_seen_in_training(stats):
    out = colour_replaced("A girl in a yellow dress sits on a green slide .", stats, random.Random(0))
    texts = {c.text for c in out}
    # "dress" was only ever yellow in training: no replacement; "slide" was green and yellow, but yellow is
    # already in the caption, so there is no clean replacement either
    assert texts == set()
    out = colour_replaced("A man in a red shirt .", stats, random.Random(0))
    assert out and all(c.kind == "colour_replaced" for c in out)
    for c in out:
        new = c.text.split()[4]
        assert new in {"blue", "green", "black", "white"} and ("A man in a " + new + " shirt .") == c.text


def test_colour_replaced_never_touches_colour_lists_or_skin(stats):
    assert colour_replaced("A black and white dog runs .", stats, random.Random(0)) == []
    assert colour_replaced("A white man runs .", stats, random.Random(0)) == []


def test_colours_swapped_needs_a_noun_for_each_colour(stats):
    [c] = colours_swapped("A red hat on a black wall .", stats)
    assert c.text == "A black hat on a red wall ."
    assert colours_swapped("A white and brown dog on a red collar .", stats) == []


def test_article_follows_the_new_word(stats):
    [c] = colours_swapped("An orange shirt on a black dog .", CaptionStats(TRAIN + ["An orange shirt ."]))
    assert c.text == "A black shirt on an orange dog ."


def test_person_swapped_refuses_pronouns_and_mixed_genders():
    [c] = person_swapped("Two men and a boy walk on the beach .")
    assert c.text == "Two women and a girl walk on the beach ."
    assert person_swapped("A man walks his dog .") == []
    assert person_swapped("A man and a woman dance .") == []
    assert person_swapped("A guy rides a bike .") == []  # no clean counterpart: left alone


def test_count_changed_and_roles_swapped(stats):
    [c] = count_changed("Two dogs play in the snow .", stats, random.Random(0))
    assert c.text == "Three dogs play in the snow ."
    [r] = roles_swapped("A dog chases a boy in the park .")
    assert r.text == "A boy chases a dog in the park ."
    assert sorted(r.text.lower().split()) == sorted("A dog chases a boy in the park .".lower().split())
    assert roles_swapped("A dog and a boy play .") == []  # symmetric: the meaning would not change


def test_prior_prefers_plausible_text_and_balance_makes_it_blind():
    prior = NgramPrior(TRAIN * 3)
    assert prior.logprob("A black dog runs on the grass .") > prior.logprob("A grass runs on the black dog .")
    items = [("k", 0.0, -1.0)] * 6 + [("k", -1.0, 0.0)] * 2 + [("j", -2.0, -1.0)] * 3 + [("j", 0.0, 0.0)]
    keep = balance(items, seed=1)
    kept = [items[i] for i in keep]
    for kind in ("k", "j"):
        rows = [r for r in kept if r[0] == kind]
        right = sum(r[1] > r[2] for r in rows)
        assert right * 2 == len(rows)
    assert len([r for r in kept if r[0] == "k"]) == 4 and not [r for r in kept if r[0] == "j"]


def test_binding_pairs_are_balanced_per_kind():
    captions = ["A man in a red shirt rides a bike .", "A woman in a blue shirt sits .", "Two dogs play .",
                "A black dog runs on the grass .", "A boy chases a dog .", "A girl on a yellow slide ."] * 3
    pairs = binding_pairs(captions, TRAIN, one_per_kind=False)
    assert pairs
    for kind in {p.kind for p in pairs}:
        rows = [p for p in pairs if p.kind == kind]
        assert 2 * sum(p.prior_true > p.prior_fake for p in rows) == len(rows)
    assert all(p.true == captions[p.caption] and p.fake != p.true for p in pairs)


def test_attributes_and_mined_negatives(stats):
    assert attributes("A man in a red shirt .") == {"colour", "person"}
    assert attributes("A dog runs .") == set()
    assert gender("A woman and her daughter .") == "female" and gender("A man and a woman .") is None
    caps = ["A man in a red shirt .", "A man in a blue shirt .", "A woman in a red shirt .", "A dog in a red collar ."]
    index = AttributeIndex(caps, [0, 1, 2, 3], stats)
    # image 1 names a shirt of another colour; image 2 only a woman; image 3 has no shirt and no person
    assert index.negatives(caps[0], 0) == {1, 2}


def test_counterfeits_never_return_the_caption_itself(stats):
    for caption in TRAIN:
        assert all(c.text.lower() != caption.lower() for c in counterfeits(caption, stats, random.Random(0)))
