"""PPO against a reward model with a KL penalty to a frozen reference (the seed's task 3).

Shapes: B rollout batch (global), M minibatch, m micro-batch, P prompt tokens (left-padded), R
response tokens (right-padded after EOS), V vocabulary.

One PPO step is a row of named phases:
    rollout (generate, forward passes, score; in chunks, on this process's rows) -> gather
    -> kl_penalised_rewards -> gae -> whiten -> ppo_epochs (minibatches of micro-batches)
Every statistic after the gather is computed on the whole global batch, so neither the number of
processes nor the chunk and micro-batch sizes change what the algorithm computes (`distributed`).
Item numbers in comments refer to ../shared/reference/ppo-details.md (in the repository's docs).
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch
from torch import nn

from ..core import (
    compute_kl_penalty,
    explained_variance,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    mismatch_metrics,
    response_mask_from_eos,
)
from ..errors import ConfigError
from ..models.forward import (
    accepts_kwarg,
    autocast,
    cast_frozen,
    compile_forward,
    compute_dtype,
    device_of,
    disable_dropout,
    float32_lm_head,
    position_ids_from_mask,
    shared_prompt_logits,
    swap_slow_gelu,
)
from ..models.generation import decode_responses, encode_prompts, sample_responses
from ..models.lora import is_peft
from ..models.policy import PolicyWithValueHead, ValueModel
from ..models.reward_ensemble import RewardEnsemble
from ..models.reward_model import RewardModel
from ..reward.shaping import clip_rewards, par_rewards
from ..reward.sources import RewardError, Rewards, RewardTerm, ScoreBatch
from .advantages import compute_advantages
from .config import CRITIC_FREE, AdaptiveKLController, FixedKLController, PPOConfig
from .distributed import TrainedModules, World, check_world
from .engines import HFEngine
from .rollout import Rollout, gather, join
from .update import NonFiniteError, PPOUpdate


def _freeze(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Frozen, in eval mode, its matmul weights stored in `dtype` (`cast_frozen`); a reward
    model's trunk only (its reward head stays float32, its unused LM head is cast too)."""
    model.eval()  # dropout off (ppo-details 2)
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(model, (RewardModel, RewardEnsemble)):  # an ensemble's heads stay float32 too
        cast_frozen(model.base_model, dtype, keep_head=False)
        return model
    return cast_frozen(model, dtype)


def _check_untrained_adapter(lm: nn.Module) -> None:
    """With no reference given, a LoRA policy's reference is its base (adapters off), which is the
    starting policy only while the adapters are still at their start, a no-op (B = 0)."""
    trained = [
        name
        for name, p in lm.named_parameters()
        if "lora_B" in name and p.requires_grad and bool(p.detach().abs().max() > 0)
    ]
    if trained:
        raise ConfigError(
            f"ref_model is None, so the reference would be this LoRA policy's base with its "
            f"adapters switched off, but the adapters are already trained ({trained[0]} is not "
            "zero): that base is not the starting policy. Pass the reference explicitly (a frozen "
            "copy of the policy as it is now, e.g. copy.deepcopy(policy).merge_and_unload())"
        )


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (works with frozen embeddings)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})


class _ModelScore:
    """The trainer's reward model as a reward source: scored on the policy's own tokens."""

    name = "reward_model"

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer
        self.where = "--reward-model"

    def score(self, batch: ScoreBatch) -> list[float]:
        query_response, attention_mask, P = batch.tokens
        scores = self.trainer._score(
            batch.prompts, batch.completions, query_response, attention_mask, P
        )  # (B,)
        if not torch.isfinite(scores).all():
            raise RewardError("the reward model returned a non-finite score")
        return scores.tolist()


def term_metrics(names: list[str], values: torch.Tensor) -> dict[str, float]:
    """`reward/<name>` (mean) and `reward/<name>_std` of each term over the rows it scored."""
    metrics = {}
    for name, column in zip(names, values.T):
        scored = column[~torch.isnan(column)]
        metrics[f"reward/{name}"] = scored.mean().item() if len(scored) else float("nan")
        metrics[f"reward/{name}_std"] = scored.std().item() if len(scored) > 1 else 0.0
    return metrics


class PPOTrainer(PPOUpdate):
    """Holds the models, the optimizer, the KL controller and the config; `step(prompts)` runs PPO.

    `policy` is a Hugging Face causal LM (wrapped with a zero-initialised value head) or a
    `PolicyWithValueHead`; `ref_model` is the frozen reference (the SFT model), or None when the
    policy is a PEFT (LoRA) model, whose reference is then itself with its adapters disabled;
    `reward_model` is a `RewardModel`. `reward_tokenizer` is needed only when it differs from
    `tokenizer`. `world` is the set of processes (`distributed`); one process by default. Training
    forward passes go through `trained`: the policy and value network as they are, wrapped in DDP,
    or sharded with FSDP2 (`PPOConfig.shard`); sampling calls the policy's LM directly.
    """

    def __init__(
        self,
        policy: nn.Module,
        ref_model: nn.Module | None,
        reward_model: RewardModel,
        tokenizer,
        config: PPOConfig | None = None,
        reward_tokenizer=None,
        gold_judge=None,
        world: World | None = None,
        reward_terms: list[RewardTerm] | None = None,
        reward_model_weight: float = 1.0,
    ):
        self.config = config or PPOConfig()
        self.config.validate()
        cfg = self.config
        self.world = world or World()
        lm = policy.lm if isinstance(policy, PolicyWithValueHead) else policy
        if ref_model is None and not is_peft(lm):
            raise ConfigError(
                "ref_model is None but the policy has no LoRA adapters to switch off; pass the "
                "reference (a frozen copy of the starting policy, e.g. copy.deepcopy(policy))"
            )
        if reward_model is None and cfg.value_model == "reward":
            raise ConfigError(
                "--value-model reward starts the critic from the reward model, and this run has "
                "none (its rewards come from functions or a server); use --value-model shared"
            )
        shares_base = getattr(reward_model, "adapter_name", None) is not None
        if ref_model is lm or (getattr(reward_model, "base_model", None) is lm and not shares_base):
            raise ConfigError(
                "the reference and reward models must be separate copies of the policy "
                "(for example copy.deepcopy(policy)); they are frozen, the policy is trained"
            )
        # The critic-free estimators build no value head (and train none they are given), nor
        # does a run whose critic is a separate value network (--value-model reward).
        self.critic_free = cfg.advantage_estimator in CRITIC_FREE
        # One update on the whole batch, the KL in the loss: the old log-probs are those the
        # update computes itself before its one step, so the rollout's no-gradient policy pass is
        # skipped and the update's own (detached) log-probs serve as old ones, as TRL's GRPO does
        # with one iteration. The first ratio is then exactly 1 by construction.
        self.one_pass = (
            self.critic_free and cfg.kl_in == "loss" and cfg.ppo_epochs == 1
            and cfg.minibatch_size == cfg.rollout_rows
        )  # fmt: skip
        # The k samples of a prompt run its tokens once in the no-value-head forward passes
        # (`shared_prompt_logits`); not under FSDP, whose blocks would be gathered twice.
        self.share_prompts = not cfg.shard
        own_head = not self.critic_free and cfg.value_model == "shared"
        self.policy = (
            policy
            if isinstance(policy, PolicyWithValueHead)
            else PolicyWithValueHead(policy, value_head=own_head)
        )
        self.policy.eval()  # dropout off in the policy too; eval() does not stop gradients
        self.device = device_of(self.policy)
        self.dtype = compute_dtype(self.device, cfg.dtype)
        if ref_model is None:
            _check_untrained_adapter(self.policy.lm)
        # The separate critic is copied before the reward model's weights are cast: it is
        # trained, so it starts from (and keeps) float32 weights.
        self.value_model = (
            ValueModel.from_reward_model(reward_model).to(self.device)
            if cfg.value_model == "reward"
            else None
        )
        self.ref_model = _freeze(ref_model, self.dtype) if ref_model is not None else None
        self.reward_model = (
            reward_model
            if shares_base or reward_model is None
            else _freeze(reward_model, self.dtype)
        )
        if is_peft(self.policy.lm):
            cast_frozen(self.policy.lm, self.dtype)  # the base weights; the adapters stay float32
        if self.policy.value_head is not None and not own_head:
            self.policy.value_head.requires_grad_(False)  # a head it was given is not trained
        # Every trained parameter is float32, the master copy AdamW updates: a bf16 weight would
        # round most small updates away. Under bf16 autocast the products still run in bf16.
        for model in (self.policy, self.value_model):
            for param in model.parameters() if model is not None else ():
                if param.requires_grad and param.is_floating_point():
                    param.data = param.data.float()
        if self.dtype != torch.float32 and cfg.fp32_lm_head:
            # Logits in float32 before the log-softmax, for the policy and the reference alike.
            for model in (self.policy.lm, self.ref_model):
                if model is not None:
                    float32_lm_head(model)
        self.tokenizer = tokenizer
        self.reward_tokenizer = (
            reward_tokenizer or getattr(reward_model, "tokenizer", None) or tokenizer
        )
        self.same_tokenizer = self.reward_tokenizer is tokenizer or (
            self.reward_tokenizer.get_vocab() == tokenizer.get_vocab()
        )
        if (
            not self.same_tokenizer and reward_model is not None
        ):  # it re-encodes the text: cut to its own positions
            from ..models.loading import config_position_limit

            config = getattr(reward_model.base_model, "config", None)
            limit = config_position_limit(config.to_dict()) if config is not None else None
            self.reward_max_length = limit or sys.maxsize
        self.gold_judge = gold_judge
        # The reward: the reward model's score (a term like any other), plus any functions or
        # servers, weighted and summed (`reward.sources`).
        model_term = [RewardTerm(_ModelScore(self), reward_model_weight)] if reward_model else []
        self.rewards = Rewards(model_term + list(reward_terms or []))
        for model in (self.policy, self.ref_model, self.reward_model, self.value_model):
            if model is not None:
                swap_slow_gelu(model)
        if cfg.gradient_checkpointing:
            # transformers checkpoints only in train mode; with every dropout probability at 0,
            # train mode computes exactly what eval mode does (ppo-details 2).
            for model in (self.policy.lm, self.value_model and self.value_model.lm):
                if model is not None:
                    disable_dropout(model)
                    enable_checkpointing(model)
        check_world(cfg, self.world)
        if cfg.shard and cfg.compile:
            raise ConfigError("--compile does not take --shard yet: compile a data-parallel run")
        if cfg.shard and (is_peft(self.policy.lm) or shares_base):
            raise ConfigError(
                "--shard does not take LoRA models (--lora-r, or a LoRA reward model on the "
                "policy's base): their trained adapters are small, so run data-parallel instead"
            )
        # Spread the models over the processes (`distributed`): DDP wraps the trained modules,
        # --shard puts every model under FSDP2 (new parameter objects); one process: as they are.
        self.trained = self.world.parallelize(
            TrainedModules(self.policy, self.value_model),
            [self.ref_model, None if shares_base else self.reward_model],
            shard=cfg.shard,
        )
        if cfg.compile:
            for model in (self.policy.lm, self.ref_model):
                if model is not None:
                    compile_forward(model)
        params = self.params = [p for p in self.trained.parameters() if p.requires_grad]
        # eps 1e-5 as in lm-human-preferences' Adam. The fused kernel updates every tensor in one
        # pass (the default of transformers' Trainer too); it needs floating-point CPU/CUDA params.
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, eps=1e-5, weight_decay=0.0, fused=fused or None
        )
        total = cfg.steps * cfg.ppo_epochs * (cfg.rollout_rows // cfg.minibatch_size)
        decay = (
            (lambda s: max(0.0, 1.0 - s / total))
            if cfg.lr_schedule == "linear"
            else (lambda s: 1.0)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        # Sampling draws come from a CPU generator for the whole global batch (the same numbers on
        # any device and at any world size); minibatch order from a second one.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.cpu_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step_count = 0
        self.engine = self._make_engine()

    def _make_engine(self):
        """The rollout engine of --rollout-engine (`engines`): it samples, the trainer scores."""
        cfg, tok = self.config, self.tokenizer
        if cfg.rollout_engine == "vllm":
            from .vllm_engine import VLLMEngine

            return VLLMEngine(
                self.policy.lm, cfg, tok.eos_token_id, tok.pad_token_id, self.device, self.dtype,
                self.world.size,
            )  # fmt: skip

        def context():
            gathered = self.world.gathered(self.policy.lm) if cfg.gather_for_sampling else None
            stack = contextlib.ExitStack()
            stack.enter_context(self._autocast())
            if gathered is not None:
                stack.enter_context(gathered)
            return stack

        return HFEngine(
            self.policy.lm, cfg, tok.eos_token_id, tok.pad_token_id, context, self.world.all_done
        )

    # ----- forward passes ------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.dtype)

    def _train_mode(self, on: bool) -> None:
        """train() only matters for gradient checkpointing; dropout is 0 either way then."""
        if self.config.gradient_checkpointing:
            self.policy.train(on)
            if self.value_model is not None:
                self.value_model.train(on)

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits divided by the sampling temperature (ppo-details 1)."""
        logits = logits.float()
        t = self.config.temperature
        return logits if t == 1.0 else logits / t

    def _policy_forward(self, ids, mask, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature-scaled logits (B, R, V) over the response positions and values (B, R)."""
        R = ids.shape[1] - P
        with self._autocast():
            # The LM head runs on the last R+1 positions only; the prompt needs no logits.
            logits, values = self.trained(
                ids, mask, logits_to_keep=R + 1, prompt_length=P if self.share_prompts else None
            )  # (B, R+1, V), (B, P+R)
        if values is None or self.critic_free:
            return self._scaled(logits[:, :-1]), torch.zeros(ids.shape[0], R, device=ids.device)
        # The logits at position P-1+t predict response token t; the value there is V(s_t).
        return self._scaled(logits[:, :-1]), values[:, P - 1 : -1].float()  # (B, R, V), (B, R)

    def _reference(self) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """The reference model, and the context it runs in (adapters off for a LoRA policy)."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        return self.policy.lm, self.policy.lm.disable_adapter()

    @torch.no_grad()
    def _ref_logits(self, ids, mask, P: int) -> torch.Tensor:
        R = ids.shape[1] - P
        model, context = self._reference()
        kwargs = {"logits_to_keep": R + 1} if accepts_kwarg(model, "logits_to_keep") else {}
        with self._autocast(), context:
            logits = (
                shared_prompt_logits(model, ids, mask, P, R + 1) if self.share_prompts else None
            )  # (B, R+1, V): each distinct prompt run once
            if logits is None:
                logits = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                    **kwargs,
                ).logits  # (B, R+1, V), or (B, P+R, V) without logits_to_keep
        return self._scaled(logits[:, -(R + 1) : -1])  # (B, R, V)

    @torch.no_grad()
    def _score(self, prompts, texts, query_response, attention_mask, P: int) -> torch.Tensor:
        """Reward-model score of each sequence, read at its EOS (ppo-details 7, 10)."""
        if not self.same_tokenizer:
            from ..reward.loss import score_texts

            # Longer sequences keep their last tokens, as `train-reward --max-length` cuts them.
            return score_texts(
                self.reward_model, self.reward_tokenizer, prompts, texts, self.reward_max_length
            ).to(self.device)
        from ..models.reward_model import score_responses

        # Rows that never emitted EOS get one appended (see score_responses); train_reward fits
        # the reward's normalisation with the same function.
        with self._autocast():
            return score_responses(
                self.reward_model, query_response[:, :P], attention_mask[:, :P],
                query_response[:, P:], self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
            )  # fmt: skip

    @torch.no_grad()
    def _reference_scores(self, prompt_ids, prompt_mask, prompts, columns, uniforms):
        """PAR's reference rewards (B, M): M responses to each row's prompt, sampled from the
        frozen reference with the draws `uniforms` (B, M, R), scored by the same `Rewards`.

        Fu et al. 2025 score responses sampled once, before training, from the SFT model; here
        they are sampled afresh every step (one more generation and scoring of B*M rows), which
        needs no file of references and has the same expectation over the reference's responses.
        """
        cfg, tok = self.config, self.tokenizer
        B, M, R = uniforms.shape
        ids = prompt_ids.repeat_interleave(M, 0)  # (B*M, P); sampling prefills each prompt once
        mask = prompt_mask.repeat_interleave(M, 0)  # (B*M, P)
        model, adapters_off = self._reference()
        gathered = (
            self.world.gathered(model) if cfg.gather_for_sampling else contextlib.nullcontext()
        )
        with self._autocast(), adapters_off, gathered:
            response = sample_responses(
                model, ids, mask, R, tok.eos_token_id, tok.pad_token_id, cfg.temperature,
                uniforms=uniforms.reshape(B * M, R), all_done=self.world.all_done,
            )  # fmt: skip
        response_mask = response_mask_from_eos(response, tok.eos_token_id)  # (B*M, R)
        texts, ended = decode_responses(tok, response, tok.eos_token_id)
        lengths = response_mask.sum(1).long().tolist()
        query_response = torch.cat([ids, response], 1)  # (B*M, P+R)
        attention_mask = torch.cat([mask, response_mask.long()], 1)  # (B*M, P+R)
        batch = ScoreBatch(
            [p for p in prompts for _ in range(M)], texts, ended,
            {name: [v for v in vs for _ in range(M)] for name, vs in columns.items()},
            [row[: n - int(e)].tolist() for row, n, e in zip(response, lengths, ended)],
            tokens=(query_response, attention_mask, ids.shape[1]),
        )  # fmt: skip
        ensemble = self.reward_model if isinstance(self.reward_model, RewardEnsemble) else None
        if ensemble is not None:  # its disagreement is logged on the policy's samples only
            ensemble.recording = False
        try:
            totals, _ = self.rewards.score(batch)
        finally:
            if ensemble is not None:
                ensemble.recording = True
        return torch.tensor(totals, dtype=torch.float32, device=self.device).view(B, M)  # (B, M)

    # ----- phases 1-4: rollout, gather, rewards and advantages ------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[str], columns: dict[str, list] | None = None) -> Rollout:
        """Sample responses to the global batch `prompts`, score them, and compute advantages.

        Each prompt is sampled --samples-per-prompt times, in consecutive rows. Each process samples and scores its share of the rows, in chunks of
        --rollout-batch-size; the shares are gathered, and the rewards and advantages are computed
        on the whole batch. The sampling draws for all rows come from one generator up front, so
        a row's response depends only on the seed, the step and its position in the batch.
        """
        cfg, world = self.config, self.world
        k = cfg.samples_per_prompt
        prompts = [p for p in prompts for _ in range(k)]
        columns = {name: [v for v in vs for _ in range(k)] for name, vs in (columns or {}).items()}
        B = len(prompts)
        if B % world.size:
            raise ConfigError(
                f"the batch of {B} sequences does not split over {world.size} processes"
            )
        uniforms = torch.rand(
            (B, cfg.response_tokens), generator=self.generator, dtype=torch.float64
        )  # (B, R)
        # PAR's reference responses: M for each row, not each prompt, so that they too depend on
        # the row's global index alone (per prompt would sample k times fewer with
        # --samples-per-prompt k); each step one more generation and scoring of B*M rows, counted
        # in time/score_s. Drawn after the policy's and only with par on: other runs keep their
        # random stream.
        ref_uniforms = (
            torch.rand(
                (B, cfg.par_samples, cfg.response_tokens),
                generator=self.generator,
                dtype=torch.float64,
            )
            if cfg.reward_shaping == "par"
            else torch.empty((B, 0, cfg.response_tokens), dtype=torch.float64)  # none
        )  # (B, M, R)
        t0 = time.perf_counter()
        self.engine.sync()  # the engine samples from the weights as they are now
        sync_s = time.perf_counter() - t0
        mine = world.shard(B)
        local, local_u, local_ref_u = prompts[mine], uniforms[mine], ref_uniforms[mine]
        local_columns = {name: vs[mine] for name, vs in columns.items()}
        chunk = cfg.rollout_batch_size or len(local)
        pieces = [
            self._rollout_chunk(
                local[s : s + chunk],
                local_u[s : s + chunk],
                {name: vs[s : s + chunk] for name, vs in local_columns.items()},
                local_ref_u[s : s + chunk],
            )  # fmt: skip
            for s in range(0, len(local), chunk)
        ]
        t0 = time.perf_counter()
        self.engine.release()
        sync_s += time.perf_counter() - t0
        b = gather(join(pieces, self.tokenizer.pad_token_id), world, self.tokenizer.pad_token_id)
        b.timings["time/engine_sync_s"] = sync_s  # pushing the weights, waking and sleeping
        self.compute_advantages(b)
        return b

    def _rollout_chunk(
        self,
        prompts: list[str],
        uniforms: torch.Tensor,
        columns: dict[str, list],
        ref_uniforms: torch.Tensor | None = None,
    ) -> Rollout:
        cfg, tok = self.config, self.tokenizer
        timings = {}
        t0 = time.perf_counter()
        prompt_ids, prompt_mask, _ = encode_prompts(tok, prompts, device=self.device)  # (B, P)
        P = prompt_ids.shape[1]
        samples = self.engine.sample(prompt_ids, prompt_mask, uniforms)
        response = samples.response  # (B, R)
        response_mask = response_mask_from_eos(response, tok.eos_token_id)  # (B, R)
        lengths = response_mask.sum(1).long()  # (B,)
        ended = (response == tok.eos_token_id).any(1)  # (B,)
        query_response = torch.cat([prompt_ids, response], 1)  # (B, P+R)
        attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)  # (B, P+R)
        texts, ended_list = decode_responses(tok, response, tok.eos_token_id)
        timings["time/generate_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.one_pass:  # the update fills the log-probs and the KL in (`PPOUpdate.update`)
            logits = None
            logprobs = torch.zeros(response.shape, device=response.device)  # (B, R)
            values = torch.zeros(response.shape, device=response.device)  # (B, R)
        else:
            logits, values = self._policy_forward(
                query_response, attention_mask, P
            )  # (B, R, V), (B, R)
            logprobs = logprobs_from_logits(logits, response)  # (B, R)
        ref_logits = self._ref_logits(query_response, attention_mask, P)  # (B, R, V)
        ref_logprobs = logprobs_from_logits(ref_logits, response)  # (B, R)
        # Per-token KL, 0 after EOS (ppo-details 10); the exact one needs both full logits.
        if self.one_pass:
            kl = torch.zeros_like(logprobs)  # (B, R), set after the update
        elif cfg.kl_estimator == "exact":
            kl = compute_kl_penalty(logits, ref_logits, response_mask)  # (B, R)
        else:
            kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)  # (B, R)
            kl = torch.where(response_mask.bool(), kl, torch.zeros_like(kl))  # (B, R)
        del logits, ref_logits
        timings["time/forward_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        completion_ids = [
            row[: n - int(e)].tolist() for row, n, e in zip(response, lengths.tolist(), ended_list)
        ]
        batch = ScoreBatch(
            list(prompts), texts, ended_list, columns, completion_ids,
            tokens=(query_response, attention_mask, P),
        )  # fmt: skip
        totals, terms = self.rewards.score(batch)
        scores = torch.tensor(totals, dtype=torch.float32, device=self.device)  # (B,)
        nan = float("nan")
        reward_terms = torch.tensor(
            [[nan if v is None else v for v in vs] for vs in terms], dtype=torch.float32
        ).T.to(self.device)  # (B, T); NaN where a term does not apply
        # --reward-shaping: PPO optimises the shaped score; the unshaped one is kept for the logs.
        unshaped, ref_scores = scores, None
        if cfg.reward_shaping == "clip":
            scores = clip_rewards(scores, cfg.reward_clip)  # (B,)
        elif cfg.reward_shaping == "par":
            ref_scores = self._reference_scores(
                prompt_ids, prompt_mask, prompts, columns, ref_uniforms
            )
            scores = par_rewards(scores, ref_scores)  # (B,)
        # On the shaped scale: the penalty replaces the shaped score.
        if cfg.missing_eos_penalty is not None:  # ppo-details 6
            scores = torch.where(ended, scores, torch.full_like(scores, cfg.missing_eos_penalty))
        timings["time/score_s"] = time.perf_counter() - t0
        return Rollout(
            query_response, attention_mask, response_mask, logprobs, ref_logprobs,
            values * response_mask, scores, kl, list(prompts), texts, ended_list,
            timings=timings, reward_terms=reward_terms,
            unshaped_scores=unshaped if cfg.reward_shaping != "none" else None,
            ref_scores=ref_scores, engine_logprobs=samples.logprobs * response_mask,
        )  # fmt: skip

    # ----- phases 2-4: rewards and advantages on the global batch ---------------------------
    def compute_advantages(self, b: Rollout) -> None:
        """Per-token rewards, advantages and returns by --advantage-estimator, set on `b`."""
        compute_advantages(b, self.config, self.kl_ctl.value)

    # ----- one step --------------------------------------------------------------------------
    def step(self, prompts: list[str], columns: dict[str, list] | None = None) -> dict[str, float]:
        """One PPO step on these prompts (the global batch, the same list in every process);
        `columns` are the prompt records' other fields, one value per prompt, for reward functions."""
        from ..text_stats import distinct_n, mean_repetition

        cfg = self.config
        start = time.perf_counter()
        beta = self.kl_ctl.value
        try:
            b = self.rollout(list(prompts), columns)
        except RewardError as exc:  # raised before any update: say which step
            raise RewardError(f"step {self.step_count + 1}: {exc}") from None
        if not torch.isfinite(b.scores).all():
            raise NonFiniteError(
                f"step {self.step_count + 1}: the reward model returned a non-finite score"
            )
        t0 = time.perf_counter()
        stats = self.update(b)
        stats["time/update_s"] = time.perf_counter() - t0
        with torch.no_grad():
            kl_seq = ((b.logprobs - b.ref_logprobs) * b.response_mask).sum(1).mean().item()
            reward = b.scores.mean().item()
            metrics = {
                "objective/reward": reward,
                "objective/kl": kl_seq,
                "objective/kl_penalty": (b.kl.sum(1)).mean().item(),
                "objective/combined": reward - beta * kl_seq,
                "objective/kl_coef": beta,
                "objective/score_std": b.scores.std().item() if len(b) > 1 else 0.0,
                "text/response_tokens": b.response_mask.sum(1).mean().item(),
                "text/eos_rate": sum(b.ended) / len(b.ended),
                "text/distinct_2": distinct_n(b.texts, 2),
                "text/repetition": mean_repetition(b.texts, 1),
                "lr": self.scheduler.get_last_lr()[0],
            }
            metrics.update(term_metrics(self.rewards.names, b.reward_terms))
            # objective/reward is the shaped reward PPO optimises; these are on the reward's scale.
            if b.unshaped_scores is not None:
                metrics["reward/unshaped"] = b.unshaped_scores.mean().item()
            if b.ref_scores is not None:
                metrics["reward/reference"] = b.ref_scores.mean().item()
            if isinstance(self.reward_model, RewardEnsemble):  # the members' disagreement
                metrics.update(self.reward_model.pop_metrics())
            if b.engine_logprobs is not None:  # how far the sampler is from the trainer
                metrics.update(
                    mismatch_metrics(
                        b.logprobs, b.engine_logprobs, b.response_mask, cfg.correction,
                        cfg.rollout_correction_cap,
                    )
                )  # fmt: skip
        if self.gold_judge is not None:
            gold = self.gold_judge.score_batch(b.prompts, b.texts, b.ended)
            metrics["objective/gold"] = sum(gold) / len(gold)
            self.last_gold = gold
        if not self.critic_free:
            metrics["val/explained_variance"] = explained_variance(
                b.values, b.returns, b.response_mask
            ).item()
            metrics["val/mean"] = masked_mean(b.values, b.response_mask).item()
        self.kl_ctl.update(kl_seq, len(b))
        self.step_count += 1
        metrics.update(stats)
        metrics.update(b.timings)
        metrics["time/step_s"] = time.perf_counter() - start
        self.last_rollout = b
        return metrics
