"""Counterfeit captions: rule-based hard negatives that change one attribute of a true caption.

Kinds (each keeps every other word of the caption):

- ``colour_replaced``: one colour word replaced by another, only where the new colour–noun bigram occurs in the
  training captions ("green slide" -> "yellow slide");
- ``colours_swapped``: two colours swapped between the nouns they modify, only where each colour has a noun of its
  own ("black hat ... red wall" -> "red hat ... black wall"; never "white and brown dog");
- ``person_swapped``: every gendered person word swapped (man/woman, boy/girl, men/women ...), only in captions
  with no pronoun that could contradict the new word and with one gender only;
- ``count_changed``: a number word before a noun replaced by another one whose bigram occurs in training ("two
  dogs" -> "three dogs");
- ``roles_swapped``: the two singular person/animal noun phrases around a verb or preposition swapped ("a dog
  chases a boy" -> "a boy chases a dog"): the same bag of words.

A blind text prior (``NgramPrior``: a trigram language model over training captions) spots implausible
counterfeits; ``balance`` keeps, per kind, as many pairs the prior gets right as pairs it gets wrong, so the prior
scores 50 % on what remains (SugarCrepe's lesson: otherwise a model scores by plausibility alone).
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

KINDS = ("colour_replaced", "colours_swapped", "person_swapped", "count_changed", "roles_swapped")

COLOURS = ("black", "white", "brown", "red", "blue", "green", "yellow", "orange", "pink", "purple", "gray", "grey",
           "tan")
# pairs a photo or an annotator easily confuses: never a counterfeit of each other
_CONFUSABLE = {frozenset(p) for p in [("gray", "grey"), ("brown", "tan"), ("pink", "purple"), ("red", "pink"),
                                      ("red", "orange"), ("orange", "yellow"), ("orange", "brown"), ("tan", "white"),
                                      ("gray", "white"), ("grey", "white"), ("gray", "black"), ("grey", "black")]}
_GENDER_PAIRS = [("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"), ("gentleman", "lady"),
                 ("gentlemen", "ladies"), ("male", "female"), ("father", "mother"), ("fathers", "mothers"),
                 ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"),
                 ("husband", "wife"), ("groom", "bride"), ("king", "queen"), ("dad", "mom"),
                 ("businessman", "businesswoman"), ("policeman", "policewoman")]
_GENDER_SWAP = {m: f for m, f in _GENDER_PAIRS} | {f: m for m, f in _GENDER_PAIRS}
# gendered words without a clean counterpart: a caption holding one is left alone
_MALE = {m for m, _ in _GENDER_PAIRS} | {"guy", "guys", "boyfriend", "daddy", "grandfather", "grandpa", "actor",
                                          "waiter", "uncle", "nephew"}
_FEMALE = {f for _, f in _GENDER_PAIRS} | {"gal", "girlfriend", "mommy", "mum", "grandmother", "grandma", "actress",
                                            "waitress", "aunt", "niece"}
_PRONOUNS = {"he", "him", "his", "himself", "she", "her", "hers", "herself"}
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SINGULAR_DETERMINERS = {"a", "an", "the", "another"}
PEOPLE = {"man", "woman", "men", "women", "boy", "girl", "boys", "girls", "person", "people", "child", "children",
          "kid", "kids", "baby", "toddler", "guy", "guys", "lady", "ladies", "player", "players", "teenager",
          "teenagers", "adult", "adults", "gentleman", "couple", "family", "crowd", "group", "biker", "skier",
          "surfer", "rider", "cyclist", "swimmer", "runner", "skateboarder", "snowboarder", "climber", "worker",
          "officer", "dancer"}
ENTITIES = {
    # people (singular)
    "man", "woman", "boy", "girl", "person", "child", "kid", "baby", "toddler", "guy", "lady", "player", "biker",
    "skier", "surfer", "rider", "cyclist", "swimmer", "runner", "skateboarder", "snowboarder", "climber",
    "teenager", "adult", "worker", "officer", "dancer", "gentleman",
    # animals
    "dog", "puppy", "cat", "kitten", "horse", "pony", "cow", "bull", "calf", "sheep", "goat", "bird", "duck",
    "goose", "camel", "elephant", "deer", "pig", "monkey", "lamb",
}
# symmetric relations: swapping the two phrases around them does not change the meaning
_SYMMETRIC = {"and", "or", "with", "near", "beside", "next", "alongside", "together", "both", "while", "as", ",",
              "behind", "front"}
FUNCTION_WORDS = {
    "a", "an", "the", "and", "or", "but", "is", "are", "was", "were", "be", "been", "being", "in", "on", "at",
    "of", "to", "with", "by", "for", "from", "into", "onto", "over", "under", "up", "down", "out", "off",
    "through", "while", "as", "that", "this", "these", "those", "his", "her", "their", "its", "he", "she", "it",
    "they", "them", "him", "who", "which", "has", "have", "near", "next", "behind", "one", "another", "some",
    "s", "and", "very", "other", "each", "there", "here", "about", "around", "across", "along", "against",
}
_TOKEN = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*|[^\sA-Za-z]")


@dataclass(frozen=True)
class Counterfeit:
    """A caption changed by one rule: ``kind`` (one of ``KINDS``), the new ``text``, and what changed."""

    kind: str
    text: str
    change: str


@dataclass(frozen=True)
class _Tok:
    start: int
    end: int
    text: str

    @property
    def low(self) -> str:
        return self.text.lower()


def tokens(caption: str) -> list[_Tok]:
    """Words (hyphenated words whole) and single punctuation marks, with their character spans."""
    return [_Tok(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(caption)]


def lm_tokens(caption: str) -> list[str]:
    """Lower-cased tokens for n-gram statistics (a final full stop dropped)."""
    words = [t.low for t in tokens(caption)]
    while words and words[-1] == ".":
        words.pop()
    return words


def _replace(caption: str, edits: Sequence[tuple[_Tok, str]]) -> str:
    """The caption with each token's span replaced by its new word (capitalisation of the old word kept; an
    article right before a replaced word follows it: "an orange ball" -> "a blue ball")."""
    toks = tokens(caption)
    position = {t.start: i for i, t in enumerate(toks)}
    edits = list(edits)
    for tok, word in list(edits):
        i = position.get(tok.start, 0)
        if i and toks[i - 1].low in ("a", "an"):
            edits.append((toks[i - 1], "an" if word[:1].lower() in "aeiou" else "a"))
    out, last = [], 0
    for tok, word in sorted(edits, key=lambda e: e[0].start):
        if tok.text[:1].isupper():
            word = word[:1].upper() + word[1:]
        out += [caption[last:tok.start], word]
        last = tok.end
    return "".join(out) + caption[last:]


class CaptionStats:
    """What the rules need from the training captions: colour–noun and number–noun bigram counts."""

    def __init__(self, captions: Iterable[str], min_count: int = 1) -> None:
        self.bigrams: Counter[tuple[str, str]] = Counter()
        for c in captions:
            w = lm_tokens(c)
            self.bigrams.update(zip(w, w[1:]))
        self.min_count = min_count
        colour_nouns: Counter[str] = Counter()
        for (a, b), n in self.bigrams.items():
            if a in COLOURS and b.isalpha() and b not in FUNCTION_WORDS and b not in COLOURS:
                colour_nouns[b] += n
        self.colour_nouns = {w for w, n in colour_nouns.items() if n >= 2}

    def seen(self, first: str, second: str) -> bool:
        return self.bigrams[(first, second)] >= self.min_count

    def pick(self, options: Sequence[str], noun: str, rng: random.Random) -> str:
        """One of ``options`` drawn in proportion to how often it precedes ``noun`` in training: the common
        alternatives ("brown dog" for "black dog") are the plausible ones, which a text prior cannot reject."""
        return rng.choices(list(options), weights=[self.bigrams[(o, noun)] for o in options])[0]


def _colour_slots(toks: list[_Tok], stats: CaptionStats) -> list[int]:
    """Positions of colour words that modify a noun of their own (not in a colour list like "black and white")."""
    slots = []
    for i, t in enumerate(toks):
        if t.low not in COLOURS or i + 1 >= len(toks):
            continue
        nxt = toks[i + 1].low
        if nxt not in stats.colour_nouns or nxt in PEOPLE:  # people's colour words name skin: not a rule here
            continue
        prev = [x.low for x in toks[max(0, i - 2):i]]
        if prev and prev[-1] in ("and", "or", ",", "-", "/") and len(prev) == 2 and prev[0] in COLOURS:
            continue
        if i >= 1 and toks[i - 1].low in COLOURS:  # "light blue" is fine, "blue green shirt" is not
            continue
        slots.append(i)
    return slots


def colour_replaced(caption: str, stats: CaptionStats, rng: random.Random) -> list[Counterfeit]:
    """One counterfeit per colour slot: the colour replaced by a random other colour seen with that noun."""
    toks = tokens(caption)
    out = []
    for i in _colour_slots(toks, stats):
        old, noun = toks[i].low, toks[i + 1].low
        options = sorted(c for c in COLOURS if c != old and frozenset((c, old)) not in _CONFUSABLE
                         and stats.seen(c, noun) and c not in {t.low for t in toks})
        if options:
            new = stats.pick(options, noun, rng)
            out.append(Counterfeit("colour_replaced", _replace(caption, [(toks[i], new)]), f"{old} {noun} -> {new}"))
    return out


def colours_swapped(caption: str, stats: CaptionStats) -> list[Counterfeit]:
    """The first two colours with nouns of their own (different colours, different nouns) swapped."""
    toks = tokens(caption)
    slots = _colour_slots(toks, stats)
    for a in range(len(slots)):
        for b in range(a + 1, len(slots)):
            i, j = slots[a], slots[b]
            ci, cj, ni, nj = toks[i].low, toks[j].low, toks[i + 1].low, toks[j + 1].low
            if ci == cj or ni == nj or frozenset((ci, cj)) in _CONFUSABLE:
                continue
            text = _replace(caption, [(toks[i], cj), (toks[j], ci)])
            return [Counterfeit("colours_swapped", text, f"{ci} {ni} / {cj} {nj} swapped")]
    return []


def person_swapped(caption: str) -> list[Counterfeit]:
    """Every gendered person word swapped, in captions of one gender without pronouns."""
    toks = tokens(caption)
    words = {t.low for t in toks}
    if words & _PRONOUNS or (words & _MALE and words & _FEMALE):
        return []
    gendered = [t for t in toks if t.low in _MALE | _FEMALE]
    if not gendered or any(t.low not in _GENDER_SWAP for t in gendered):
        return []
    edits = [(t, _GENDER_SWAP[t.low]) for t in gendered]
    change = ", ".join(f"{t.low} -> {w}" for t, w in edits)
    return [Counterfeit("person_swapped", _replace(caption, edits), change)]


def count_changed(caption: str, stats: CaptionStats, rng: random.Random) -> list[Counterfeit]:
    """The first number word before a noun replaced by another number seen with that noun."""
    toks = tokens(caption)
    for i, t in enumerate(toks[:-1]):
        noun = toks[i + 1].low
        if t.low not in NUMBERS or noun in FUNCTION_WORDS or not noun.isalpha():
            continue
        options = sorted(n for n in NUMBERS if n != t.low and stats.seen(n, noun))
        if options:
            new = stats.pick(options, noun, rng)
            return [Counterfeit("count_changed", _replace(caption, [(t, new)]), f"{t.low} {noun} -> {new}")]
    return []


def _entity_phrases(toks: list[_Tok]) -> list[tuple[int, int]]:
    """Token spans [start, end) of singular noun phrases "a/an/the/another (up to 3 words) ENTITY"."""
    spans = []
    for i, t in enumerate(toks):
        if t.low not in ENTITIES:
            continue
        for start in range(i - 1, max(-1, i - 5), -1):
            w = toks[start].low
            if w in _SINGULAR_DETERMINERS:
                spans.append((start, i + 1))
                break
            if w in FUNCTION_WORDS or not w[:1].isalpha() or w in ENTITIES:
                break
    return spans


def roles_swapped(caption: str) -> list[Counterfeit]:
    """The first two singular person/animal phrases with an asymmetric relation between them swapped."""
    toks = tokens(caption)
    spans = _entity_phrases(toks)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        between = {t.low for t in toks[a1:b0]}
        if not between or between & _SYMMETRIC or toks[a1 - 1].low == toks[b1 - 1].low:
            continue
        first = caption[toks[a0].start:toks[a1 - 1].end]
        second = caption[toks[b0].start:toks[b1 - 1].end]
        if a0 == 0:  # the sentence start moves: capitalisation follows the position
            first, second = first[:1].lower() + first[1:], second[:1].upper() + second[1:]
        text = (caption[:toks[a0].start] + second + caption[toks[a1 - 1].end:toks[b0].start] + first
                + caption[toks[b1 - 1].end:])
        return [Counterfeit("roles_swapped", text, f"{first.lower()} <-> {second.lower()}")]
    return []


def counterfeits(caption: str, stats: CaptionStats, rng: random.Random,
                 kinds: Sequence[str] = KINDS) -> list[Counterfeit]:
    """Every counterfeit the rules make of ``caption`` (colour replacements: one per colour slot)."""
    makers = {
        "colour_replaced": lambda: colour_replaced(caption, stats, rng),
        "colours_swapped": lambda: colours_swapped(caption, stats),
        "person_swapped": lambda: person_swapped(caption),
        "count_changed": lambda: count_changed(caption, stats, rng),
        "roles_swapped": lambda: roles_swapped(caption),
    }
    out = []
    for kind in kinds:
        out += [c for c in makers[kind]() if c.text.strip().lower() != caption.strip().lower()]
    return out


class NgramPrior:
    """Blind text prior: an interpolated Kneser-Ney trigram model of training captions (lower-cased tokens).

    ``logprob(caption)`` is the caption's log probability; of a true caption and its counterfeit, the prior
    "picks" the more probable one. It never sees an image.
    """

    def __init__(self, captions: Iterable[str], discount: float = 0.75) -> None:
        self.d = discount
        tri: Counter[tuple[str, str, str]] = Counter()
        for c in captions:
            w = ["<s>", "<s>"] + lm_tokens(c) + ["</s>"]
            tri.update(zip(w, w[1:], w[2:]))
        self.tri = tri
        self.ctx2: Counter[tuple[str, str]] = Counter()  # c(u v .)
        self.types2: Counter[tuple[str, str]] = Counter()  # N1+(u v .)
        cont_bi: Counter[tuple[str, str]] = Counter()  # N1+(. v w)
        for (u, v, w), n in tri.items():
            self.ctx2[(u, v)] += n
            self.types2[(u, v)] += 1
            cont_bi[(v, w)] += 1
        self.cont_bi = cont_bi
        self.ctx1: Counter[str] = Counter()  # N1+(. v .)
        self.types1: Counter[str] = Counter()  # N1+(. v) as a context: distinct w after v
        cont_uni: Counter[str] = Counter()  # N1+(. w) over bigram types
        for (v, w), n in cont_bi.items():
            self.ctx1[v] += n
            self.types1[v] += 1
            cont_uni[w] += 1
        self.cont_uni = cont_uni
        self.total_uni = sum(cont_uni.values())
        self.vocab = len(cont_uni) + 1

    def _p_uni(self, w: str) -> float:
        return (self.cont_uni[w] + 0.5) / (self.total_uni + 0.5 * self.vocab)

    def _p_bi(self, v: str, w: str) -> float:
        c = self.ctx1[v]
        if not c:
            return self._p_uni(w)
        return (max(self.cont_bi[(v, w)] - self.d, 0.0) + self.d * self.types1[v] * self._p_uni(w)) / c

    def _p_tri(self, u: str, v: str, w: str) -> float:
        c = self.ctx2[(u, v)]
        if not c:
            return self._p_bi(v, w)
        return (max(self.tri[(u, v, w)] - self.d, 0.0) + self.d * self.types2[(u, v)] * self._p_bi(v, w)) / c

    def logprob(self, caption: str) -> float:
        w = ["<s>", "<s>"] + lm_tokens(caption) + ["</s>"]
        return float(sum(math.log(self._p_tri(a, b, c)) for a, b, c in zip(w, w[1:], w[2:])))


def balance(items: Sequence[tuple[str, float, float]], seed: int = 0) -> list[int]:
    """Indices of ``(kind, prior logprob of the true caption, of the counterfeit)`` items to keep: per kind, as many
    where the prior prefers the true caption as where it prefers the counterfeit (ties dropped), so the prior
    scores exactly 50 % on the kept items. Order of the result follows ``items``."""
    by_kind: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, (kind, true_lp, fake_lp) in enumerate(items):
        if true_lp != fake_lp:
            by_kind[kind][0 if true_lp > fake_lp else 1].append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for kind in sorted(by_kind):
        right, wrong = by_kind[kind]
        n = min(len(right), len(wrong))
        keep += rng.sample(right, n) + rng.sample(wrong, n)
    return sorted(keep)


def colour_nouns(caption: str, stats: CaptionStats) -> list[tuple[str, str]]:
    """The (colour, noun) pairs of a caption where the colour modifies a noun of its own ("red shirt")."""
    toks = tokens(caption)
    return [(toks[i].low, toks[i + 1].low) for i in _colour_slots(toks, stats)]


def gender(caption: str) -> str | None:
    """``"male"`` or ``"female"`` when the caption's person words are all of one gender, else None."""
    words = {t.low for t in tokens(caption)}
    male, female = bool(words & _MALE), bool(words & _FEMALE)
    return "male" if male and not female else "female" if female and not male else None


def confusable(a: str, b: str) -> bool:
    """Whether two colour words are too close to be told apart reliably (never a counterfeit of each other)."""
    return a == b or frozenset((a, b)) in _CONFUSABLE


def attributes(caption: str) -> set[str]:
    """Which binding attributes a caption names: ``"colour"`` (a colour word) and/or ``"person"`` (a gendered
    person word such as man, woman, boy, girl)."""
    words = {t.low for t in tokens(caption)}
    found = set()
    if words & set(COLOURS):
        found.add("colour")
    if words & (_MALE | _FEMALE):
        found.add("person")
    return found


@dataclass(frozen=True)
class BindingPair:
    """A true caption (``caption``: its index in the caption list) and one counterfeit of it, with the blind
    prior's log probability of each."""

    caption: int
    kind: str
    true: str
    fake: str
    change: str
    prior_true: float
    prior_fake: float


def binding_pairs(captions: Sequence[str], train_captions: Sequence[str], *, seed: int = 0,
                  kinds: Sequence[str] = KINDS, one_per_kind: bool = True,
                  prior: NgramPrior | None = None) -> list[BindingPair]:
    """Counterfeit pairs of ``captions``, balanced so that a prior built from ``train_captions`` scores 50 % per
    kind. ``one_per_kind``: at most one counterfeit per caption and kind (the first colour slot), so the pairs of
    a benchmark are not near-copies of each other."""
    stats = CaptionStats(train_captions)
    prior = prior or NgramPrior(train_captions)
    rng = random.Random(seed)
    found: list[tuple[int, Counterfeit]] = []
    for c, text in enumerate(captions):
        seen_kinds: set[str] = set()
        for cf in counterfeits(text, stats, rng, kinds):
            if one_per_kind and cf.kind in seen_kinds:
                continue
            seen_kinds.add(cf.kind)
            found.append((c, cf))
    true_lp = {c: prior.logprob(captions[c]) for c in {c for c, _ in found}}
    pairs = [BindingPair(c, cf.kind, captions[c], cf.text, cf.change, true_lp[c], prior.logprob(cf.text))
             for c, cf in found]
    keep = balance([(p.kind, p.prior_true, p.prior_fake) for p in pairs], seed)
    return [pairs[i] for i in keep]
