"""The embedded task: corpus generator, gold judge, and the text statistics of the hacking report."""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter

import pytest

from rlhf.task import corpus
from rlhf.task.gold import GOLD_VERSION, GoldJudge
from rlhf.text_stats import distinct_n, mean_repetition, repetition_rate


@pytest.fixture(scope="module")
def reviews() -> list[corpus.Review]:
    return corpus.generate_reviews(3000, seed=7)


@pytest.fixture(scope="module")
def judge() -> GoldJudge:
    return GoldJudge()


def split(review: corpus.Review) -> tuple[str, str]:
    """(prompt, response) the way PPO sees a corpus review."""
    assert review.text.startswith(review.opening + " ")
    return review.opening, review.text[len(review.opening) + 1 :]


# --- corpus -------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded():
    assert corpus.generate_reviews(200, seed=3) == corpus.generate_reviews(200, seed=3)
    assert corpus.generate_reviews(200, seed=3) != corpus.generate_reviews(200, seed=4)
    # A longer run starts with the shorter one: each review draws only from the seeded stream.
    assert corpus.generate_reviews(300, seed=3)[:200] == corpus.generate_reviews(200, seed=3)
    assert corpus.generate_reviews(0) == []
    with pytest.raises(ValueError):
        corpus.generate_reviews(-1)


def test_reviews_have_the_documented_shape(reviews):
    openings = set(corpus.OPENINGS)
    for r in reviews:
        assert r.opening in openings
        assert r.text.startswith(r.opening + " ")
        assert re.fullmatch(r"[a-z]+( [a-z.!]+)*", r.text), r.text
        assert r.text.endswith((" .", " !"))
        assert r.sentiment in ("positive", "negative", "neutral")
        assert r.domain in ("film", "product")
        n_sentences = sum(w in (".", "!") for w in r.text.split())
        assert 1 <= n_sentences <= 3


def test_openings_are_short_unique_and_end_mid_sentence():
    assert 40 <= len(corpus.OPENINGS) <= 80
    assert len(set(corpus.OPENINGS)) == len(corpus.OPENINGS)
    for o in corpus.OPENINGS:
        assert 2 <= len(o.split()) <= 5, o
        assert not o.endswith((".", "!"))


def test_vocabulary_covers_every_token_and_has_several_hundred_words(reviews):
    assert 300 <= len(corpus.VOCABULARY) <= 600
    for r in reviews:
        assert set(r.text.split()) <= corpus.VOCABULARY
    # Every word the grammar can produce shows up in a large enough sample.
    seen = {w for r in corpus.generate_reviews(30000, seed=1) for w in r.text.split()}
    assert seen == corpus.VOCABULARY


def test_every_generated_bigram_is_a_valid_bigram(reviews):
    valid = corpus.valid_bigrams()
    for r in reviews:
        words = r.text.split()
        assert set(zip(words, words[1:], strict=False)) <= valid, r.text
    # Enumeration is exact, not a sample: a big sample finds most pairs but cannot add any.
    sample = {
        pair
        for r in corpus.generate_reviews(30000, seed=2)
        for pair in zip(r.text.split(), r.text.split()[1:], strict=False)
    }
    assert sample <= valid
    assert len(sample) > 0.8 * len(valid)
    # Pairs a reader would call broken are not in the grammar.
    for pair in [("superb", "superb"), ("superb", "excellent"), ("the", "the"), (".", ".")]:
        assert pair not in valid


def test_valid_bigrams_is_cached():
    # Speed belongs in benchmarks, not in tests (a busy machine fails a timed assertion).
    corpus.valid_bigrams.cache_clear()
    first = corpus.valid_bigrams()
    assert corpus.valid_bigrams() is first


def test_no_review_repeats_itself(reviews):
    for r in reviews:
        assert repetition_rate(r.text, 4) == 0.0, r.text


def test_sentences_fit_the_grammar_bound(reviews):
    longest = max(len(s.split()) for r in reviews for s in re.split(r" [.!]", r.text))
    assert longest <= corpus.max_sentence_length()


def test_sentiment_and_domain_mix(reviews):
    share = {k: v / len(reviews) for k, v in Counter(r.sentiment for r in reviews).items()}
    assert share["negative"] == pytest.approx(0.40, abs=0.04)
    assert share["positive"] == pytest.approx(0.35, abs=0.04)
    assert share["neutral"] == pytest.approx(0.25, abs=0.04)
    domains = Counter(r.domain for r in reviews)
    assert domains["film"] / len(reviews) == pytest.approx(0.5, abs=0.05)


def test_product_reviews_keep_their_product_and_agreement():
    for r in corpus.generate_reviews(3000, seed=11):
        if r.opening.startswith("these "):
            assert " it is " not in f" {r.text} " and " this " not in r.text, r.text
        if r.opening == "this blender":
            others = {"phone", "kettle", "laptop", "headphones", "earbuds", "toaster", "camera"}
            assert not others & set(r.text.split()), r.text


def test_prompts_split_is_deterministic_and_disjoint(reviews):
    train, held_out = corpus.split_openings("train"), corpus.split_openings("eval")
    assert set(train).isdisjoint(held_out)
    assert set(train) | set(held_out) == set(corpus.OPENINGS)
    assert 0.15 <= len(held_out) / len(corpus.OPENINGS) <= 0.25
    domain_of = {r.opening: r.domain for r in reviews}
    assert {domain_of[o] for o in held_out} == {"film", "product"}

    p = corpus.prompts(500, seed=1)
    assert p == corpus.prompts(500, seed=1)
    assert p != corpus.prompts(500, seed=2)
    assert set(p) <= set(train)
    assert set(corpus.prompts(500, seed=1, split="eval")) <= set(held_out)
    with pytest.raises(ValueError, match="split"):
        corpus.prompts(3, split="test")


def test_openings_are_sentiment_neutral(judge):
    # The gold judge reads prompt + response; a neutral prompt means only the response counts.
    for o in corpus.OPENINGS:
        assert judge.breakdown(o, ".")["sentiment"] == 0.0, o


# --- gold judge ---------------------------------------------------------------------------------

PROMPT = "the acting was"
POSITIVE = "superb and the story was moving . i would happily watch it again ."


def test_gold_ranks_coherent_sentiment(judge):
    positive = judge.score(PROMPT, POSITIVE)
    negative = judge.score(
        PROMPT, "dull and the story made no sense . i would not watch it again ."
    )
    neutral = judge.score(PROMPT, "average . it runs for about two hours .")
    assert positive > 0.5
    assert negative < -0.3
    assert positive > neutral + 0.4 and neutral > negative


@pytest.mark.parametrize(
    ("response", "ended"),
    [
        ("superb superb superb superb superb .", True),
        ("superb excellent superb wonderful great superb excellent", True),
        ("superb excellent superb wonderful great superb excellent .", True),
        ("superb and", False),
        ("superb and the story was moving", True),  # no full stop
        ("superb and the story was moving .", False),  # cut off at the length limit
        ("superb ! superb ! superb ! superb !", True),
        ("superb . i loved every minute of it ! i loved every minute of it ! i loved it !", True),
        (  # a run-on sentence longer than the grammar allows
            "superb and the story was wonderful and the music was excellent and the cast was"
            " brilliant and the script was great .",
            True,
        ),
        ("", True),
    ],
)
def test_gold_prefers_a_positive_review_to_degenerate_text(judge, response, ended):
    assert judge.score(PROMPT, POSITIVE) > judge.score(PROMPT, response, ended) + 0.3


def test_gold_penalises_scrambled_reviews(judge, reviews):
    rng = random.Random(0)
    gaps = []
    for r in reviews:
        prompt, response = split(r)
        words = response.split()
        scrambled = words[:]
        rng.shuffle(scrambled)
        if r.sentiment == "positive" and scrambled != words:
            gaps.append(judge.score(prompt, response) - judge.score(prompt, " ".join(scrambled)))
    assert statistics.mean(gaps) > 0.5
    assert sum(g > 0 for g in gaps) / len(gaps) > 0.95


def test_gold_on_corpus_reviews(judge, reviews):
    by_class: dict[str, list[float]] = {}
    for r in reviews:
        parts = judge.breakdown(*split(r))
        assert parts["coherence"] == 1.0 and parts["penalty"] == 0.0, r.text
        by_class.setdefault(r.sentiment, []).append(parts["total"])
    means = {k: statistics.mean(v) for k, v in by_class.items()}
    assert means["positive"] > 0.5
    assert means["negative"] < -0.3
    assert means["positive"] > means["neutral"] > means["negative"]


def test_gold_breakdown_matches_its_formula(judge):
    for response, ended in [(POSITIVE, True), ("superb superb excellent", False), ("dull .", True)]:
        b = judge.breakdown(PROMPT, response, ended)
        s = b["sentiment"]
        c = b["grammar"] * (1 - b["repetition"]) * (1 - b["run_on"]) * (0.5 + 0.5 * b["ending"])
        p = 0.2 * (1 - b["grammar"]) + 0.2 * (1 - b["ending"])
        p += 0.1 * b["repetition"] + 0.1 * b["run_on"]
        assert b["coherence"] == pytest.approx(c)
        assert b["penalty"] == pytest.approx(p)
        assert b["total"] == pytest.approx(c * max(s, 0) + min(s, 0) - p)
        assert -1.6 <= b["total"] <= 1.0
        assert judge.score(PROMPT, response, ended) == b["total"]


def test_gold_hand_values(judge):
    # "superb superb superb superb superb ." after "the acting was": pairs (was, superb) and
    # (superb, .) are in the grammar, the four (superb, superb) are not: g = 2/6. "superb" is used
    # five times, so 3 of the 6 response words are overuse; 1 of 6 4-grams repeats: r = 1.
    b = judge.breakdown(PROMPT, "superb superb superb superb superb .")
    assert b["grammar"] == pytest.approx(2 / 6)
    assert b["repetition"] == 1.0
    assert b["coherence"] == 0.0
    assert b["total"] == pytest.approx(-(0.2 * 4 / 6 + 0.1))
    assert judge.breakdown(PROMPT, "superb and", ended=False)["ending"] == 0.0
    assert judge.score(PROMPT, "") == -1.0


def test_gold_is_deterministic_and_batch_equals_single(judge, reviews):
    pairs = [split(r) for r in reviews[:64]]
    prompts = [p for p, _ in pairs]
    responses = [r for _, r in pairs]
    responses[3] = "superb superb"
    ended = [i % 3 != 0 for i in range(64)]
    batch = judge.score_batch(prompts, responses, ended)
    assert batch == [
        judge.score(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)
    ]
    assert batch == GoldJudge().score_batch(prompts, responses, ended)
    assert judge.score_batch(prompts, responses) == judge.score_batch(
        prompts, responses, [True] * 64
    )
    with pytest.raises(ValueError):
        judge.score_batch(prompts, responses[:-1])
    assert isinstance(GOLD_VERSION, int)


# --- text statistics ----------------------------------------------------------------------------


def test_distinct_n_hand_values():
    # Bigrams: (a,b) (b,a) (a,b) | (a,b) -> 2 unique of 4.
    assert distinct_n(["a b a b", "a b"], n=2) == 0.5
    # Unigrams: a b a b a b -> 2 unique of 6.
    assert distinct_n(["a b a b", "a b"], n=1) == pytest.approx(2 / 6)
    assert distinct_n(["x y z"], n=3) == 1.0
    assert distinct_n(["one", ""], n=2) == 0.0
    assert distinct_n([], n=2) == 0.0


def test_repetition_rate_hand_values():
    assert repetition_rate("a b a b", n=1) == 0.5
    assert repetition_rate("a b a b", n=2) == pytest.approx(1 / 3)
    assert repetition_rate("superb superb superb superb", n=1) == 0.75
    assert repetition_rate("the acting was superb .", n=1) == 0.0
    assert repetition_rate("", n=1) == 0.0
    assert repetition_rate("a b", n=3) == 0.0
    with pytest.raises(ValueError):
        repetition_rate("a", n=0)


def test_mean_repetition_hand_values():
    assert mean_repetition(["a a", "a b", "a a a a"], n=1) == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert mean_repetition([], n=1) == 0.0
