"""Where rewards come from: a learned reward model, Python functions, a reward server, summed.

A reward source is anything with a `name` and `score(batch) -> list[float | None]`: one reward per
row of a `ScoreBatch`, or None where it does not apply to that row. `Rewards` holds the weighted
terms the trainer calls, checks what each returns, and adds them up:

    total(row) = sum of weight * value over the terms whose value is not None

A row that no term scores is an error, as is a wrong number of values, a value that is not a
finite number, or a function that raises: each stops the step before any weight changes, in one
line that names the term, the row and the value (`RewardError`).

Reward functions take TRL's signature (`GRPOTrainer(reward_funcs=...)`), so functions written for
it work unchanged: `fn(prompts=..., completions=..., completion_ids=..., **columns)`, where
`columns` are the prompt records' other fields (an `answer` column reaches a verifier).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, RLHFError


class RewardError(RLHFError):
    """A reward term failed or returned something that is not one finite number per row."""


class RewardUnavailable(RLHFError):
    """A reward source that lives elsewhere (a server) could not be reached, after retries.

    Unlike a `RewardError` the run is not at fault: it checkpoints and says how to resume.
    """


@dataclass
class ScoreBatch:
    """The rows to score: the prompts as the policy saw them and its completions.

    `columns` holds the prompt records' other fields, one value per row. `completion_ids` are the
    policy's tokens of each completion (EOS excluded). `tokens` is whatever a source that reads
    the policy's own token tensors needs (the trainer's reward model does); others ignore it.
    """

    prompts: list[str]
    completions: list[str]
    ended: list[bool]
    columns: dict[str, list] = field(default_factory=dict)
    completion_ids: list[list[int]] | None = None
    tokens: Any = None

    def __len__(self) -> int:
        return len(self.prompts)


class RewardSource(Protocol):
    name: str

    def score(self, batch: ScoreBatch) -> Sequence[float | None]: ...


def _show(text: str, limit: int = 40) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(text)


def check_values(name: str, values, batch: ScoreBatch) -> list[float | None]:
    """`values` as one float (or None) per row of `batch`, or a `RewardError` saying which."""
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"reward {name}: returned {type(values).__name__} {values!r:.60}, not a list with "
            f"one value per row ({len(batch)} rows)"
        ) from None
    if len(values) != len(batch):
        raise RewardError(
            f"reward {name}: returned {len(values)} values for {len(batch)} rows; return one "
            "per completion (None where it does not apply)"
        )
    checked = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()  # a 0-d tensor or NumPy scalar
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RewardError(
                f"reward {name}: row {i} (prompt {_show(batch.prompts[i])}): returned "
                f"{value!r:.60}, not a number"
            )
        if not math.isfinite(value):
            raise RewardError(
                f"reward {name}: row {i} (prompt {_show(batch.prompts[i])}, completion "
                f"{_show(batch.completions[i])}): returned {value}, not a finite number"
            )
        checked.append(float(value))
    return checked


@dataclass
class RewardTerm:
    source: RewardSource
    weight: float = 1.0


class Rewards:
    """The weighted sum of reward terms; `terms[i].source.name` names `reward/<name>` in the logs."""

    def __init__(self, terms: list[RewardTerm]):
        if not terms:
            raise ConfigError(
                "no reward: give --reward-model, --reward-fn or --reward-url (or none of them "
                "for the built-in task's reward model)"
            )
        names = [t.source.name for t in terms]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ConfigError(
                f"two reward terms are both named {doubled[0]}; each is logged as reward/<name>, "
                "so give them different names (FILE.py:NAME picks the function's name)"
            )
        self.terms = terms

    @property
    def names(self) -> list[str]:
        return [t.source.name for t in self.terms]

    def score(self, batch: ScoreBatch) -> tuple[list[float], list[list[float | None]]]:
        """(total per row, each term's values per row) for `batch`."""
        values = []
        for term in self.terms:
            try:
                raw = term.source.score(batch)
            except (RewardError, RewardUnavailable, ConfigError):
                raise
            except Exception as exc:  # the user's function: say which one and what it raised
                where = getattr(term.source, "where", term.source.name)
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise RewardError(
                    f"reward {term.source.name} ({where}) raised {type(exc).__name__}"
                    f"{': ' + first[:200] if first else ''} on a batch of {len(batch)} rows "
                    f"(first prompt {_show(batch.prompts[0])})"
                ) from exc
            values.append(check_values(term.source.name, raw, batch))
        totals = []
        for i in range(len(batch)):
            parts = [t.weight * v[i] for t, v in zip(self.terms, values) if v[i] is not None]
            if not parts:
                raise RewardError(
                    f"row {i} (prompt {_show(batch.prompts[i])}): every reward term returned "
                    f"None ({', '.join(self.names)}); at least one must score each row"
                )
            totals.append(math.fsum(parts))
        return totals, values


class RewardFunction:
    """A Python function with TRL's reward signature, called with keyword arguments."""

    def __init__(self, fn: Callable, name: str | None = None, where: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.where = where or self.name
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a builtin or C function: pass everything
            params = ()
        self.takes_all = not params or any(p.kind is p.VAR_KEYWORD for p in params)
        self.accepts = {p.name for p in params}

    def score(self, batch: ScoreBatch) -> Sequence[float | None]:
        offered = {
            "prompts": batch.prompts,
            "completions": batch.completions,
            "completion_ids": batch.completion_ids,
            **batch.columns,
        }
        # A function with **kwargs gets everything (TRL's do); one without gets what it names.
        kwargs = (
            offered if self.takes_all else {k: v for k, v in offered.items() if k in self.accepts}
        )
        return self.fn(**kwargs)


def load_reward_function(spec: str) -> RewardFunction:
    """`FILE.py:NAME` or `package.module:NAME` as a `RewardFunction`; a bad spec is one line."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(
            f"--reward-fn {spec}: expected FILE.py:NAME or package.module:NAME (for example "
            "rewards.py:format_reward)"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"--reward-fn {spec}: no such file {path}")
        module_name = f"rlhf_reward_fn_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise ConfigError(
                f"--reward-fn {spec}: importing {path} raised {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"--reward-fn {spec}: cannot import {target} ({exc})") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        hint = f"; it has {', '.join(found[:8])}" if found else ""
        raise ConfigError(f"--reward-fn {spec}: {target} has no function {name}{hint}")
    check = getattr(fn, "check", None)  # a ready-made function says what it needs, up front
    if callable(check):
        check()
    return RewardFunction(fn, name=name, where=spec)


def parse_weights(text: str | None, count: int, option: str = "--reward-weights") -> list[float]:
    """Comma-separated weights, one per reward function (all 1 when not given)."""
    if text is None or not text.strip():
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} {text}: expected comma-separated numbers") from None
    if len(weights) != count:
        raise ConfigError(
            f"{option} {text}: {len(weights)} weights for {count} reward function(s); give one "
            "per --reward-fn, in order"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"{option} {text}: every weight must be a finite number")
    return weights
