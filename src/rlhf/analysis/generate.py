"""`rlhf generate`: find a policy in what the user gave (a run folder, a model folder, a LoRA
adapter), load it, and sample responses to prompts; `rlhf eval` samples the same way.

Shapes: N rows (prompt x sample), B batch, P prompt tokens (left-padded), R response tokens.

Every row's random draws are fixed up front from --seed (`row_draws`), so a row's response does not
depend on --batch-size or on the other rows, and two models given the same draws sample with common
random numbers: a comparison of their responses is paired.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import read_prompts, write_jsonl
from ..errors import InputError
from ..models.forward import autocast
from ..tracking import progress_bar
from .sampling_config import GenerateConfig, SamplingArgs

RUN_KINDS = {"ppo": "ppo_epochs", "dpo": "beta", "sft": "completion_only_loss"}
"""a run's kind, told by an option only its config.json has"""
DEFAULT_RESPONSE_TOKENS = 48
GENERATE_BUILTIN_PROMPTS = 8


@dataclass
class PolicySource:
    """Where a policy's weights are, and the run that made it (if any)."""

    path: Path
    """the folder as the user gave it"""
    model_dir: Path
    """the folder with the weights: a whole model, or a LoRA adapter"""
    base_dir: Path | None = None
    """the base model a LoRA adapter goes on (None: a whole model)"""
    run_dir: Path | None = None
    """the run folder it belongs to (None: a plain model folder)"""
    run_config: dict = field(default_factory=dict)
    """the run's config.json ({} outside a run)"""
    kind: str = "model"
    """ppo, dpo or sft (the run's command), or model"""

    @property
    def builtin(self) -> bool:
        """Whether the run was on the built-in task: its base model, or its prompts or pairs."""
        cfg = self.run_config
        if not cfg:
            return False
        own_inputs = {"ppo": "prompts", "dpo": "data"}.get(self.kind)
        return cfg.get("model") is None or (own_inputs is not None and cfg.get(own_inputs) is None)

    @property
    def task(self) -> str:
        """The built-in task the run was on: reviews (the default) or arithmetic."""
        return self.run_config.get("task") or "reviews"

    def describe(self) -> str:
        what = f"LoRA adapter on {self.base_dir}" if self.base_dir else "model"
        run = f" of the {self.kind} run {self.run_dir}" if self.run_dir else ""
        return f"{self.model_dir} ({what}{run})"


def _run_config(folder: Path) -> dict | None:
    """A run's config.json (written by `tracking.save_config`, with `_environment`), or None."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and "_environment" in cfg else None


def builtin_base_dir(cache_dir: str | None, progress: bool = True, task: str = "reviews") -> Path:
    if task == "arithmetic":
        from ..task.arithmetic_model import arithmetic_model_dir

        return arithmetic_model_dir(cache_dir=cache_dir, progress=progress)
    from ..task.default import base_model_dir

    return base_model_dir(cache_dir=cache_dir, progress=progress)


def run_model(source: PolicySource, cache_dir: str | None, progress: bool = True) -> Path:
    """The model the run started from: its --model, or the built-in base model."""
    given = source.run_config.get("model")
    if given is None:
        return builtin_base_dir(
            cache_dir or source.run_config.get("cache_dir"), progress, source.task
        )
    path = Path(given)
    if not path.is_dir():
        raise InputError(
            f"{source.run_dir}/config.json: the run's --model {given} is not there (moved, or "
            "given relative to another folder); give the folder with --base-model"
        )
    return path


def resolve_policy(
    path: str | Path,
    base_model: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> PolicySource:
    """What `path` holds: a run folder (its policy/ or model/), a model folder or a LoRA adapter.

    Checks only files; loads nothing but, for an adapter whose run started from the built-in base
    model, that cached model (trained on first use).
    """
    from ..models.loading import check_model_dir
    from ..models.lora import ADAPTER_CONFIG
    from ..models.reward_model import REWARD_HEAD_FILE

    given = Path(path)
    if not given.exists():
        raise InputError(
            f"{given}: no such folder; give a run folder (the --out of rlhf ppo, dpo or sft), a "
            "Hugging Face model folder or a LoRA adapter folder"
        )
    if not given.is_dir():
        raise InputError(f"{given}: expected a folder (a run, a model or an adapter), got a file")
    run_cfg = _run_config(given)
    if run_cfg is not None:
        run_dir = given
        inner = next((given / n for n in ("policy", "model") if (given / n).is_dir()), None)
        if inner is None:
            if (given / "reward_model").is_dir():
                raise InputError(
                    f"{given}: holds a reward model (rlhf train-reward), not a policy; give it to "
                    "rlhf eval as --reward-model"
                )
            raise InputError(
                f"{given}: a run folder without policy/ or model/ (the run has not finished; "
                "an interrupted rlhf ppo continues with --resume)"
            )
        model_dir = inner
    else:
        model_dir = given
        parent_cfg = _run_config(given.parent)
        run_dir, run_cfg = (given.parent, parent_cfg) if parent_cfg is not None else (None, {})
    if (model_dir / REWARD_HEAD_FILE).is_file():
        raise InputError(
            f"{model_dir}: a reward model (rlhf train-reward), not a policy; give it to rlhf eval "
            "as --reward-model"
        )
    kind = next((k for k, key in RUN_KINDS.items() if key in run_cfg), "model")
    source = PolicySource(given, model_dir, None, run_dir, run_cfg, kind)
    if not (model_dir / ADAPTER_CONFIG).is_file():
        check_model_dir(model_dir)
        return source
    source.base_dir = adapter_base_dir(source, base_model, cache_dir, progress)
    return source


def adapter_base_dir(
    source: PolicySource, base_model: str | None, cache_dir: str | None, progress: bool
) -> Path:
    """--base-model, else the base the adapter names, else the run's --model (or built-in base)."""
    from ..models.loading import check_model_dir
    from ..models.lora import ADAPTER_CONFIG, adapter_base

    if base_model:
        return check_model_dir(base_model)
    try:
        named = adapter_base(source.model_dir)
    except InputError:  # no base_model_name_or_path: the run's config may still say
        named = None
    if named is not None and named.is_dir():
        return check_model_dir(named)
    if source.run_config:
        return check_model_dir(run_model(source, cache_dir, progress))
    raise InputError(
        f"{source.model_dir / ADAPTER_CONFIG}: the adapter's base model {named} is not here "
        "(base_model_name_or_path); give its folder with --base-model"
    )


def load_lm(source: PolicySource, tokenizer, trust_remote_code: bool = False):
    """The policy as a plain causal LM (an adapter merged into its base, for speed), eval mode."""
    from ..models.loading import load_causal_lm, match_vocab
    from ..models.lora import load_adapter, peft_quietly

    if source.base_dir is None:
        lm = load_causal_lm(source.model_dir, trust_remote_code=trust_remote_code)
        match_vocab(lm, tokenizer, source.model_dir)
        return lm
    base = load_causal_lm(source.base_dir, trust_remote_code=trust_remote_code)
    match_vocab(
        base, tokenizer, source.model_dir
    )  # the pad token the run added, before the adapter
    with peft_quietly():
        return load_adapter(base, source.model_dir).merge_and_unload().eval()


def load_tokenizer_for(source: PolicySource, cfg: SamplingArgs, chat: bool):
    """The tokenizer saved with the policy, with --eos-token applied."""
    from ..models.loading import apply_eos_option, load_tokenizer

    tokenizer = load_tokenizer(source.model_dir, trust_remote_code=cfg.trust_remote_code)
    return apply_eos_option(tokenizer, cfg.eos_token, source.model_dir, chat)


def uses_chat_template(cfg: SamplingArgs, source: PolicySource) -> bool:
    if cfg.chat_template is not None:
        return cfg.chat_template
    return bool(source.run_config.get("chat_template", False))


def response_tokens(cfg: SamplingArgs, source: PolicySource) -> int:
    """--response-tokens, else what the run sampled with (PPO's rollouts, DPO's gold samples)."""
    if cfg.response_tokens is not None:
        return cfg.response_tokens
    run = source.run_config
    key = {"ppo": "response_tokens", "dpo": "eval_response_tokens"}.get(source.kind)
    return int(run.get(key) or DEFAULT_RESPONSE_TOKENS) if key else DEFAULT_RESPONSE_TOKENS


def read_prompt_texts(
    cfg: SamplingArgs, source: PolicySource, listed: list[str], builtin_default: int, draw: bool
) -> tuple[list, str]:
    """The raw prompts (text, or conversations from a file) and where they came from.

    `listed` are prompts typed on the command line. On the built-in task with no prompts given,
    `--num-prompts` (or `builtin_default`) held-out openings: drawn with replacement when `draw`
    (as `rlhf dpo` draws its evaluation prompts), else distinct ones in a seeded order.
    """
    from ..errors import ConfigError

    if listed:
        return list(listed[: cfg.num_prompts]), "the command line"
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts, field=cfg.prompt_field)
        return prompts[: cfg.num_prompts], str(cfg.prompts)
    if not source.builtin:
        raise ConfigError(
            f"{source.path} was not trained on the built-in task, so there are no default prompts: "
            "give --prompts FILE (or, for rlhf generate, --prompt TEXT)"
        )
    n = cfg.num_prompts or builtin_default
    if source.task == "arithmetic":  # held-out problems, distinct while there are enough
        from ..task.arithmetic import arithmetic_prompts

        records = arithmetic_prompts(n, seed=cfg.seed, split="eval")
        return [r["prompt"] for r in records], "the arithmetic task's held-out problems"
    from ..task import corpus

    if draw:
        return corpus.prompts(n, seed=cfg.seed, split="eval"), "the built-in held-out openings"
    openings = list(corpus.split_openings("eval"))
    random.Random(cfg.seed).shuffle(openings)
    return (openings * (n // len(openings) + 1))[:n], "the built-in held-out openings"


def prepare_prompts(tokenizer, prompts: list, chat: bool, cfg: SamplingArgs, source: str) -> list:
    """The text each model is given: conversations rendered, long prompts cut, the chat template."""
    from ..models.generation import (
        apply_chat_template,
        render_prompt_conversations,
        truncate_prompts,
    )

    if prompts and isinstance(prompts[0], list):
        prompts = render_prompt_conversations(tokenizer, prompts, cfg.prompts, source)
        chat = False  # rendered already
    prompts, n_cut = truncate_prompts(tokenizer, prompts, cfg.max_prompt_tokens)
    if n_cut:
        print(
            f"warning: {n_cut} of {len(prompts)} prompts are longer than --max-prompt-tokens "
            f"{cfg.max_prompt_tokens}; they keep their last tokens"
        )
    return apply_chat_template(tokenizer, prompts, source) if chat else prompts


def row_draws(n_rows: int, response_tokens: int, seed: int) -> torch.Tensor:
    """The uniform draws of every row and position, (N, R), from one seeded CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n_rows, response_tokens), generator=generator, dtype=torch.float64)


@dataclass
class Samples:
    """Sampled responses, one per row, in the order of the prompts given."""

    prompts: list[str]
    """each row's prompt as the model saw it"""
    responses: list[list[int]]
    """response token ids, up to and including the first EOS"""
    texts: list[str]
    """response text, without the EOS"""
    ended: list[bool]
    """whether the response ended with EOS (else it ran to --response-tokens)"""


@torch.no_grad()
def sample(
    lm, tokenizer, prompts: list[str], draws: torch.Tensor, temperature: float = 1.0,
    top_k: int = 0, top_p: float = 1.0, batch_size: int = 64, device=None, desc: str = "sampling",
    progress: bool = True,
) -> Samples:  # fmt: skip
    """Sample one response per prompt, row i from `draws[i]` (N, R)."""
    from ..models.generation import (
        decode_responses,
        encode_prompts,
        response_lengths,
        sample_responses,
    )

    device = device or torch.device("cpu")
    out = Samples([], [], [], [])
    bar = progress_bar(total=len(prompts), desc=desc, disable=not progress, leave=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        ids, mask, _ = encode_prompts(tokenizer, chunk, device=device)  # (B, P)
        with autocast(device):
            response = sample_responses(
                lm, ids, mask, draws.shape[1], eos, pad, temperature=temperature, top_k=top_k,
                top_p=top_p, uniforms=draws[s : s + len(chunk)].to(device),
            )  # (B, R)  # fmt: skip
        lengths, _ = response_lengths(response, eos)  # (B,)
        texts, ended = decode_responses(tokenizer, response, eos)
        out.prompts += chunk
        out.responses += [row[:n] for row, n in zip(response.tolist(), lengths.tolist())]
        out.texts += texts
        out.ended += ended
        bar.update(len(chunk))
    bar.close()
    return out


def generate(cfg: GenerateConfig, progress: bool = True) -> dict:
    """Sample `cfg.num_samples` responses to each prompt and write them to a JSONL file.

    Returns {"rows", "out", "replaced", "policy", "source", "prompts_from", "response_tokens"}.
    """
    from ..models.loading import pick_device

    cfg.validate()
    device = pick_device(cfg.device)
    source = resolve_policy(cfg.policy, cfg.base_model, cfg.cache_dir, progress)
    raw, prompts_from = read_prompt_texts(cfg, source, cfg.prompt, GENERATE_BUILTIN_PROMPTS, False)
    chat = uses_chat_template(cfg, source)
    tokenizer = load_tokenizer_for(source, cfg, chat or isinstance(raw[0], list))
    prompts = prepare_prompts(tokenizer, raw, chat, cfg, f"the tokenizer in {source.model_dir}")
    lm = load_lm(source, tokenizer, cfg.trust_remote_code).to(device)
    R = response_tokens(cfg, source)
    rows_raw = [p for p in raw for _ in range(cfg.num_samples)]  # row i*S + j: prompt i, sample j
    rows_text = [p for p in prompts for _ in range(cfg.num_samples)]
    samples = sample(
        lm, tokenizer, rows_text, row_draws(len(rows_text), R, cfg.seed), cfg.temperature,
        cfg.top_k, cfg.top_p, cfg.batch_size, device, "generate", progress,
    )  # fmt: skip
    rows = [
        {
            "prompt": prompt,
            "response": text,
            "ended": ended,
            "response_tokens": len(ids),
            "sample": i % cfg.num_samples,
            "seed": cfg.seed,
        }  # fmt: skip
        for i, (prompt, text, ended, ids) in enumerate(
            zip(rows_raw, samples.texts, samples.ended, samples.responses)
        )
    ]
    default_home = source.run_dir if source.run_dir is not None else Path(".")
    out = Path(cfg.out) if cfg.out else default_home / "generations.jsonl"
    replaced = out.is_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    return {
        "rows": rows, "out": out, "replaced": replaced, "policy": source.describe(), "source": source,
        "prompts_from": prompts_from, "response_tokens": R,
    }  # fmt: skip


def format_rows(rows: list[dict], n: int, width: int = 100) -> str:
    """The first `n` rows as the terminal shows them: the prompt, then the response indented."""
    import textwrap

    lines = []
    for row in rows[:n]:
        tail = "" if row["ended"] else " [no EOS: cut at --response-tokens]"
        prompt = row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"])
        lines.append(textwrap.shorten(f"> {prompt}", width, placeholder=" ..."))
        lines += textwrap.wrap(row["response"] + tail, width, initial_indent="  ",
                               subsequent_indent="  ") or ["  (empty)"]  # fmt: skip
    return "\n".join(lines)
