"""Text statistics for the reward-hacking report: diversity across samples, repetition within one.

Texts are split on whitespace; an n-gram is a tuple of n consecutive tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams, pooled over `texts` (Li et al. 2016, "distinct-n").

    A policy that collapses onto one phrase drives this towards 0. Returns 0.0 when the texts hold
    no n-gram at all.
    """
    grams = [g for text in texts for g in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 1) -> float:
    """Fraction of the n-grams in `text` that repeat an n-gram seen earlier in the same text.

    "a b a b" with n=1 gives 2/4; with n=2 the bigrams are ab, ba, ab, so 1/3. 0.0 when the text
    holds no n-gram.
    """
    grams = _ngrams(text.split(), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def mean_repetition(texts: Sequence[str], n: int = 1) -> float:
    """Mean of `repetition_rate` over `texts` (0.0 for no texts)."""
    return sum(repetition_rate(t, n) for t in texts) / len(texts) if texts else 0.0
