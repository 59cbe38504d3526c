"""Ready-made reward functions, for `rlhf ppo --reward-fn rlhf.reward.verifiers:NAME`.

`math_accuracy` checks a completion's final answer against the record's reference with Hugging
Face's `math-verify` (an optional extra, `pip install 'rlhf[math]'`), the verifier TRL's
`accuracy_reward` uses: LaTeX (`\\boxed{\\frac{1}{2}}`) and plain expressions (`0.5`) are parsed
and compared as mathematical objects, so equal answers written differently match.
"""

from __future__ import annotations

from ..errors import ConfigError


def _require_math_verify() -> None:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--reward-fn rlhf.reward.verifiers:math_accuracy needs the math-verify package: "
            "pip install 'rlhf[math]'"
        ) from None


def _text(completion) -> str:
    """A completion's text; a conversational one (a list of messages) gives its last turn's."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def math_accuracy(completions, solution=None, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the completion's answer equals the reference (`solution`, TRL's column name, or
    `answer`), else 0.0; None for a row without a reference or whose reference does not parse
    (the row is then scored by the other reward terms only)."""
    from math_verify import parse, verify

    references = solution if solution is not None else answer
    if references is None:
        raise ConfigError(
            "math_accuracy needs each prompt record's reference answer in a 'solution' or "
            "'answer' field"
        )
    rewards: list[float | None] = []
    for completion, reference in zip(completions, references):
        if reference is None or str(reference).strip() == "":
            rewards.append(None)
            continue
        # The reference is taken at its first parse (it is one answer); the completion may
        # mention several numbers on the way, and math-verify matches any of its final answers.
        gold = parse(str(reference), extraction_mode="first_match")
        if not gold:
            rewards.append(None)
            continue
        rewards.append(float(verify(gold, parse(_text(completion)))))
    return rewards


math_accuracy.check = _require_math_verify  # run by `load_reward_function`, before any model loads
