"""The pieces of the reward-KL frontier that `frontier` (`rlhf sweep`) assembles: the best-of-n
baseline and the functional forms of Gao, Schulman and Hilton (2022).
"""

from __future__ import annotations


def fit_functional_form(d: list[float], r: list[float], form: str) -> tuple[float, float]:
    """Least-squares (a, b) of R(d) = d (a - b log d) for "rl" or R(d) = d (a - b d) for "bon".

    Both are linear in (a, b), so this is a two-column least-squares problem; R is the gold score
    relative to the reference policy's, so R(0) = 0 as in Gao et al.
    """
    import numpy as np

    d_arr, r_arr = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    keep = d_arr > 0
    d_arr, r_arr = d_arr[keep], r_arr[keep]
    second = -d_arr * np.log(d_arr) if form == "rl" else -(d_arr**2)
    design = np.stack([d_arr, second], axis=1)  # (N, 2)
    (a, b), *_ = np.linalg.lstsq(design, r_arr, rcond=None)
    return float(a), float(b)


def best_of_n_curve(
    lm,
    tokenizer,
    reward_model,
    judge,
    prompts: list[str],
    n_max: int,
    response_tokens: int,
    seed: int,
) -> list[dict]:
    """Best-of-n against the reference policy for n = 1, 2, 4, ... n_max.

    For each prompt n_max responses are sampled once; best-of-n keeps the first n and picks the one
    the reward model scores highest. Its KL from the reference is log n - (n - 1) / n (Stiennon et al.
    2020, appendix), exact for the analytic best-of-n distribution.
    """
    import math

    import torch

    from ..models.forward import device_of
    from ..models.generation import sample_texts
    from ..reward.loss import score_texts

    device = device_of(lm)
    doubled = [p for p in prompts for _ in range(n_max)]
    texts, ended = sample_texts(
        lm,
        tokenizer,
        doubled,
        response_tokens,
        generator=torch.Generator(device=device).manual_seed(seed),
        device=device,
    )
    proxy = (
        score_texts(reward_model, tokenizer, doubled, texts).cpu().view(len(prompts), n_max)
    )  # (N, n_max)
    gold = torch.tensor(judge.score_batch(doubled, texts, ended)).view(
        len(prompts), n_max
    )  # (N, n_max)
    points, n = [], 1
    while n <= n_max:
        best = proxy[:, :n].argmax(1)  # (N,)
        rows = torch.arange(len(prompts))
        kl = math.log(n) - (n - 1) / n
        points.append({
            "n": n, "kl": kl, "d": math.sqrt(kl),
            "proxy": proxy[rows, best].mean().item(), "gold": gold[rows, best].mean().item(),
        })  # fmt: skip
        n *= 2
    return points


def fit_terms(a: float, b: float, term: str, digits: int = 2) -> str:
    """`a - b term` for a fitted R(d) = d (a - b term), with the sign of a negative b folded in."""
    sign = "-" if b >= 0 else "+"
    return f"{a:.{digits}f} {sign} {abs(b):.{digits}f} {term}"
