"""`RewardEnsemble`: N reward models on one shared, frozen base, and the rules that combine them.

Shapes: N members, B batch, T tokens, H hidden size.

Each member is a LoRA adapter (PEFT, named member0 ... member{N-1}) with its own `RewardModel`
head and normalisation, all on one copy of the base weights. Coste et al. (2023, "Reward Model
Ensembles Help Mitigate Overoptimization") combine the members' scores by their mean, their
minimum (worst case), or uncertainty-weighted optimisation (UWO): the mean minus lambda times
the members' variance (`combine_rewards`).

What a member costs: in memory, its adapter (r x (d_in + d_out) per adapted layer) and its head
(H + 1); the base is held once. Per scoring call, one forward pass of the base with its adapter:
N members cost N passes. Several heads on one trunk would cost one pass, but their members would
differ only in a linear probe of the same features; LoRA members each adapt the trunk, so they
disagree more where the data says less, which is what the ensemble is for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..data import atomic_write_json
from ..errors import ConfigError, InputError
from .loading import check_model_dir, load_causal_lm, load_tokenizer, match_vocab
from .lora import ADAPTER_CONFIG, adapter_base, add_lora, apply_lora, load_adapter
from .lora_args import LoraArgs
from .reward_model import (
    ENSEMBLE_FILE,
    REWARD_HEAD_FILE,
    RewardModel,
    check_reward_model_dir,
    load_safetensors,
    reward_model_folder,
)

ENSEMBLE_RULES = ("mean", "min", "uwo")
ENSEMBLE_FORMAT = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def combine_rewards(
    scores: torch.Tensor, rule: str = "mean", uncertainty_coef: float = 0.0
) -> torch.Tensor:
    """One reward per row from the members' scores (N, B); shape (B,).

    mean: the members' mean. min: the worst case over members. uwo: the mean minus
    `uncertainty_coef` times the members' variance, the population variance (divided by N, not
    N - 1), as Coste et al. write it; one member then has variance 0, not NaN.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (N, B), got {tuple(scores.shape)}")
    if rule == "mean":
        return scores.mean(0)  # (B,)
    if rule == "min":
        return scores.min(0).values  # (B,)
    if rule == "uwo":
        return scores.mean(0) - uncertainty_coef * scores.var(0, unbiased=False)  # (B,)
    raise ValueError(f"rule must be one of {', '.join(ENSEMBLE_RULES)}, got {rule!r}")


def ensemble_metrics(scores: torch.Tensor) -> dict[str, float]:
    """The members' disagreement on these rows (N, B): `reward/ensemble_std` (mean over rows of
    the members' population std), `reward/ensemble_range` (mean of max - min) and each member's
    mean score, `reward/member<k>`."""
    scores = scores.detach().float()
    metrics = {
        "reward/ensemble_std": scores.std(0, unbiased=False).mean().item(),
        "reward/ensemble_range": (scores.max(0).values - scores.min(0).values).mean().item(),
    }
    for k, mean in enumerate(scores.mean(1).tolist()):
        metrics[f"reward/member{k}"] = mean
    return metrics


def check_rule(rule: str, uncertainty_coef: float) -> None:
    """A known rule and a finite, non-negative lambda (`ConfigError` naming the PPO option)."""
    if rule not in ENSEMBLE_RULES:
        raise ConfigError(
            f"--reward-ensemble must be one of {', '.join(ENSEMBLE_RULES)}, got {rule!r}"
        )
    if not (uncertainty_coef >= 0 and uncertainty_coef < float("inf")):
        raise ConfigError(
            f"--uncertainty-coef must be a finite number >= 0, got {uncertainty_coef}"
        )


class RewardEnsemble(nn.Module):
    """N reward models that share one frozen base; `forward` gives their combined reward.

    `base_model` is a PEFT model holding the members' adapters (`member_names`); each member is
    a `RewardModel` that runs the base with its own adapter switched on. The rule and lambda can
    be changed at any time (`rule`, `uncertainty_coef`). Member k's head is drawn from
    `seed + k`. Each forward under no_grad keeps the members' scores: `last_member_scores` (N, B),
    and running sums that `pop_metrics` turns into the disagreement metrics since its last call.
    """

    def __init__(
        self,
        base_model: nn.Module,
        member_names: list[str],
        tokenizer=None,
        rule: str = "mean",
        uncertainty_coef: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        check_rule(rule, uncertainty_coef)
        if not member_names:
            raise ConfigError("an ensemble needs at least one member")
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.member_names = list(member_names)
        members = []
        for k, name in enumerate(self.member_names):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + k)
                members.append(RewardModel(base_model, freeze_base=False, adapter_name=name))
        self.members = nn.ModuleList(members)
        self.rule, self.uncertainty_coef = rule, uncertainty_coef
        self.last_member_scores: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None  # (N + 2,): std, range, each member; then rows
        self._rows = 0
        # Off while scoring rows that are not the policy's (PAR's reference responses), so the
        # disagreement logged, and watched by the alarm, is on the policy's samples only.
        self.recording = True

    @classmethod
    def from_base(
        cls, lm: nn.Module, lora: LoraArgs, n_members: int, seed: int = 0, tokenizer=None
    ) -> RewardEnsemble:
        """N fresh members on `lm` (wrapped in place, not copied); member k's adapter and head
        are drawn from `seed + k`. The base weights are frozen; each member's adapter and head
        are trainable."""
        names = [f"member{k}" for k in range(n_members)]
        base = apply_lora(lm, lora, adapter_name=names[0], seed=seed)
        for k, name in enumerate(names[1:], 1):
            add_lora(base, lora, name, seed=seed + k)
        ensemble = cls(base, names, tokenizer=tokenizer, seed=seed)
        for k in range(n_members):
            for p in ensemble.member_parameters(k):
                p.requires_grad_(True)
        return ensemble

    def __len__(self) -> int:
        return len(self.members)

    def member_parameters(self, k: int) -> list[nn.Parameter]:
        """Member k's own weights: its adapter's and its head's."""
        tag = f".{self.member_names[k]}."
        own = [p for n, p in self.base_model.named_parameters() if tag in n]
        return own + list(self.members[k].reward_head.parameters())

    def member_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each member's normalised reward, shape (N, B)."""
        return torch.stack([m(input_ids, attention_mask) for m in self.members])  # (N, B)

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """The members' scores (N, B) combined by this ensemble's rule; shape (B,)."""
        return combine_rewards(scores, self.rule, self.uncertainty_coef)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The combined normalised reward, shape (B,)."""
        scores = self.member_scores(input_ids, attention_mask)  # (N, B)
        if not torch.is_grad_enabled() and self.recording:
            self._record(scores)
        return self.combine(scores)

    def raw_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The rule applied to the heads' outputs before each member's normalisation, (B,)."""
        raw = torch.stack([m.raw_forward(input_ids, attention_mask) for m in self.members])
        return self.combine(raw)  # (B,)

    def _record(self, scores: torch.Tensor) -> None:
        """Running sums over rows (constant memory, however long nobody reads them)."""
        scores = scores.detach().float()  # (N, B)
        self.last_member_scores = scores
        row_sums = torch.cat(
            [
                scores.std(0, unbiased=False).sum().reshape(1),
                (scores.max(0).values - scores.min(0).values).sum().reshape(1),
                scores.sum(1),
            ]
        ).double()  # (N + 2,)
        self._sums = row_sums if self._sums is None else self._sums + row_sums
        self._rows += scores.shape[1]

    def pop_metrics(self) -> dict[str, float]:
        """`ensemble_metrics` over every row scored since the last call (none: {}), then reset."""
        if not self._rows:
            return {}
        means = (self._sums / self._rows).tolist()
        self._sums, self._rows = None, 0
        metrics = {"reward/ensemble_std": means[0], "reward/ensemble_range": means[1]}
        metrics.update({f"reward/member{k}": m for k, m in enumerate(means[2:])})
        return metrics

    def save_pretrained(self, directory: str | Path) -> None:
        """Write each member as a LoRA reward model in its own sub-folder (PEFT adapter naming
        its base folder, head in safetensors), the tokenizer, and last `ensemble.json`, so that
        an interrupted save is not taken for an ensemble."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, member in zip(self.member_names, self.members):
            member.save_pretrained(directory / name)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        base = adapter_base(directory / self.member_names[0])
        atomic_write_json(
            directory / ENSEMBLE_FILE,
            {
                "format": ENSEMBLE_FORMAT,
                "members": self.member_names,
                "base_model": str(base),
                "rule": self.rule,
                "uncertainty_coef": self.uncertainty_coef,
            },
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        trust_remote_code: bool = False,
        rule: str | None = None,
        uncertainty_coef: float | None = None,
        **model_kwargs,
    ) -> RewardEnsemble:
        """Load an ensemble saved by `save_pretrained`: its base once, then each member's adapter
        and head (safetensors only). `rule` and `uncertainty_coef` replace the saved ones."""
        directory = Path(directory)
        spec = read_ensemble_spec(directory)
        member_dirs = [directory / name for name in spec["members"]]
        for name, folder in zip(spec["members"], member_dirs):
            for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, REWARD_HEAD_FILE):
                if not (folder / file).is_file():
                    raise InputError(
                        f"{folder / file}: missing; member {name} of the ensemble in {directory} "
                        "is incomplete (train it again with `rlhf train-reward --ensemble`)"
                    )
            load_safetensors(folder / ADAPTER_WEIGHTS)  # a damaged file: one line saying which
        bases = {adapter_base(folder).resolve() for folder in member_dirs}  # each has a config
        if len(bases) > 1:
            raise InputError(f"{directory}: the members adapt different base models")
        tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        base_dir = check_model_dir(bases.pop())
        base = load_causal_lm(base_dir, trust_remote_code=trust_remote_code, **model_kwargs)
        match_vocab(base, tokenizer, directory)
        for name, folder in zip(spec["members"], member_dirs):
            base = load_adapter(base, folder, adapter_name=name)
        ensemble = cls(
            base,
            spec["members"],
            tokenizer=tokenizer,
            rule=rule if rule is not None else spec.get("rule", "mean"),
            uncertainty_coef=(
                uncertainty_coef
                if uncertainty_coef is not None
                else spec.get("uncertainty_coef", 0.0)
            ),
        )
        for member, folder in zip(ensemble.members, member_dirs):
            member.load_head(folder / REWARD_HEAD_FILE)
        return ensemble.eval()


def is_ensemble_dir(directory: str | Path) -> bool:
    return (Path(directory) / ENSEMBLE_FILE).is_file()


def ensemble_base(directory: str | Path) -> Path:
    """The base model folder an ensemble's members adapt (as its first member's adapter names)."""
    directory = Path(directory)
    spec = read_ensemble_spec(directory)
    base = adapter_base(directory / spec["members"][0])
    if base is None:
        raise InputError(
            f"{directory / spec['members'][0]}: no {ADAPTER_CONFIG}; the ensemble is incomplete"
        )
    return base


def read_ensemble_spec(directory: Path) -> dict:
    """ensemble.json, checked: a format this code reads and a list of member names."""
    path = directory / ENSEMBLE_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({type(exc).__name__})") from None
    if not isinstance(spec, dict) or spec.get("format") != ENSEMBLE_FORMAT:
        raise InputError(f"{path}: not an ensemble file of format {ENSEMBLE_FORMAT}")
    members = spec.get("members")
    if (
        not isinstance(members, list)
        or not members
        or not all(isinstance(m, str) and m and "/" not in m and m != ".." for m in members)
        or len(set(members)) != len(members)
    ):
        raise InputError(f"{path}: 'members' must be a list of distinct member folder names")
    return spec


def load_reward_model(
    directory: str | Path,
    trust_remote_code: bool = False,
    share_base: nn.Module | None = None,
    rule: str | None = None,
    uncertainty_coef: float | None = None,
    **model_kwargs,
) -> RewardModel | RewardEnsemble:
    """The reward model in `directory` (or in the `reward_model/` of a `rlhf train-reward` run
    folder): a `RewardEnsemble` if it holds one, else a `RewardModel` (`share_base` applies to a
    single LoRA reward model only; an ensemble loads its own base)."""
    directory = check_reward_model_dir(reward_model_folder(directory))
    if is_ensemble_dir(directory):
        return RewardEnsemble.from_pretrained(
            directory, trust_remote_code, rule=rule, uncertainty_coef=uncertainty_coef,
            **model_kwargs,
        )  # fmt: skip
    return RewardModel.from_pretrained(
        directory, trust_remote_code=trust_remote_code, share_base=share_base, **model_kwargs
    )
