"""Forward passes through any Hugging Face causal LM: devices, position ids, final hidden states.

Shapes: B batch, T tokens, H hidden size.

Position ids are rebuilt from the attention mask for every forward pass that is not generation, so
left padding does not shift positions (ppo-details 4).
"""

from __future__ import annotations

import contextlib
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn


def unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row of each distinct row of `x` (U,), and which of them each row is (B,)."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)  # (B,) into the sorted distinct rows
    first = torch.full((int(inverse.max()) + 1,), x.shape[0], dtype=torch.long, device=x.device)
    first = first.scatter_reduce(0, inverse, torch.arange(x.shape[0], device=x.device), "amin")
    order = torch.argsort(first)  # distinct rows in order of first appearance
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=x.device))
    return first[order], rank[inverse]


def _plain_cache(cache) -> bool:
    """A transformers cache made of plain growing layers (no sliding window, no quantisation)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def shared_prompt_logits(
    lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, P: int, keep: int
) -> torch.Tensor | None:
    """Logits (B, keep, V) of the last `keep` positions (keep <= R + 1), with each distinct prompt
    of `ids[:, :P]` run through the model once: its keys and values are copied to every row that
    shares it, and only the responses `ids[:, P:]` are run per row (PrefixGrouper, Liu et al.
    2025, does this for GRPO's groups: the k samples of a prompt share its forward pass).

    The numbers are the one-pass forward's up to float rounding; gradients reach the prompt's
    positions through the copied keys and values. Returns None where it does not apply (every
    prompt distinct, a model without a transformers cache, gradient checkpointing on, whose
    training forward drops the cache); the caller then runs the whole rows as usual.
    """
    B, R = ids.shape[0], ids.shape[1] - P
    inner = unwrap(lm)
    checkpointing = getattr(
        inner, "is_activation_checkpointing", None
    )  # transformers 5.x; older ones call it is_gradient_checkpointing
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if R < 1 or keep > R + 1 or checkpointing:
        return None
    cache_arg = "cache" if accepts_kwarg(lm, "cache") else "past_key_values"
    if not accepts_kwarg(lm, cache_arg) or not accepts_kwarg(lm, "logits_to_keep"):
        return None
    rows, which = unique_rows(torch.cat([ids[:, :P], mask[:, :P]], 1))  # (U,), (B,)
    if len(rows) == B:
        return None
    positions = position_ids_from_mask(mask)  # (B, P+R)
    first = lm(
        input_ids=ids[rows, :P], attention_mask=mask[rows, :P], position_ids=positions[rows, :P],
        use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    cache = first[cache_arg]
    if not _plain_cache(cache):
        return None
    for layer in cache.layers:  # (U, ...) -> (B, ...): each row gets its prompt's keys and values
        # index_select, whose backward is index_add_: indexing with a tensor backpropagates
        # through index_put_ with accumulation, several times slower on the CPU.
        layer.keys = layer.keys.index_select(0, which)
        layer.values = layer.values.index_select(0, which)
    rest = lm(
        input_ids=ids[:, P:],
        attention_mask=mask,
        position_ids=positions[:, P:],
        use_cache=True,
        logits_to_keep=min(keep, R),
        **{cache_arg: cache},
    ).logits  # (B, min(keep, R), V)
    if keep <= R:
        return rest
    return torch.cat([first.logits[which], rest], 1)  # (B, R+1, V)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def hidden_size_of(model: nn.Module) -> int:
    """Width of the final hidden state, whatever the config calls it."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        size = getattr(config, name, None)
        if isinstance(size, int) and size > 0:
            return size
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.embedding_dim
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... counted over real tokens only, so left padding does not shift positions."""
    positions = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return positions.clamp(min=0)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding alike."""
    T = attention_mask.shape[-1]
    steps = torch.arange(T, device=attention_mask.device)  # (T,)
    return (attention_mask.long() * steps).argmax(-1)  # (B,)


def unwrap(module: nn.Module) -> nn.Module:
    """The Hugging Face model inside the wrappers that hide its signature behind `**kwargs`.

    PEFT's `PeftModel` (its `get_base_model()` is the model with the adapter layers injected, so
    calling it still applies the adapters) and torch's DDP (`.module`) pass every keyword through.
    """
    for _ in range(4):  # a DDP-wrapped PEFT model is two levels deep
        if hasattr(module, "get_base_model"):
            module = module.get_base_model()
        elif type(module).__name__ == "DistributedDataParallel":
            module = module.module
        else:
            break
    return module


def accepts_kwarg(module: nn.Module, argument: str) -> bool:
    """Whether `module.forward` takes this keyword argument by name.

    Wrappers whose forward takes `**kwargs` and passes it on (PEFT, DDP) are looked through:
    otherwise `position_ids` would be dropped for a PEFT policy and left padding would shift
    positions (ppo-details 4).
    """
    try:
        return argument in inspect.signature(unwrap(module).forward).parameters
    except (TypeError, ValueError):
        return False


def trunk_of(lm: nn.Module) -> nn.Module:
    """The transformer body of a causal LM, without its LM head (GPT2LMHeadModel -> GPT2Model).

    Adapters injected by PEFT live inside the body's layers, so calling the body applies them.
    """
    model = unwrap(lm)
    return getattr(model, "base_model", model)


def final_hidden_states(
    lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Hidden states of the last layer (after the final norm), without computing LM logits."""
    trunk = trunk_of(lm)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if accepts_kwarg(trunk, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    out = trunk(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)


def swap_slow_gelu(model: nn.Module) -> int:
    """Replace transformers' `gelu_new` modules with torch's one-kernel tanh GELU; returns how many.

    GPT-2's `gelu_new` runs as separate pow, mul, add and tanh kernels; `nn.GELU("tanh")` is the
    same function (within 3e-7 in float32) in one kernel, about 10% of a PPO step on the default
    model (benchmarks/README.md). Saved weights and configs are unchanged.
    """
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover - an older or newer transformers without it
        return 0
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The dtype matrix products run in: bf16 on a CUDA device that has it (`auto`), else float32.

    On the CPU `auto` is float32: CPU bf16 is slower than float32 for small models.
    """
    if requested == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[requested]


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to `dtype` (default: `compute_dtype(device)`); a no-op for float32."""
    dtype = dtype or compute_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(unwrap(model), "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def _matmul_layers(model: nn.Module, keep_head: bool = True) -> list[nn.Module]:
    """The layers whose forward autocast runs in the low-precision dtype anyway: nn.Linear and
    transformers' Conv1D (GPT-2's addmm), leaving out every layer whose weight is shared with an
    embedding (GPT-2 ties its LM head to the token embeddings) and, with `keep_head`, the output
    head."""
    head = _output_head(model) if keep_head else None
    embedded = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    layers = []
    for module in model.modules():
        if module is head or not (
            isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        ):
            continue
        if any(id(p) in embedded for p in module.parameters(recurse=False)):
            continue
        layers.append(module)
    return layers


def cast_frozen(model: nn.Module, dtype: torch.dtype, keep_head: bool = True) -> nn.Module:
    """Store the frozen weights of the matrix-multiply layers in `dtype`; leave the rest as is.

    Under autocast a linear layer computes in the low dtype whatever its weight is stored in: an
    fp32 weight is rounded to bf16 for the product, exactly as storing it in bf16 rounds it. So
    these weights can be kept in bf16 (half the memory: they are nearly all of a model) without
    changing what the model computes. Embeddings, norms and the output head are different:
    autocast does not round them, so an fp32 model keeps its embeddings, its residual stream and
    its norms in fp32. They stay in fp32 here too, so that a frozen reference computes exactly
    what the fp32 policy it was copied from computes (KL 0 at step 0, to the last bit); verl keeps
    actor and reference in one compute dtype for the same reason. Trained parameters are never
    cast. `keep_head=False` casts an untied output head too (a reward model's trunk, whose LM
    head is never run).
    """
    if dtype == torch.float32:
        return model
    for module in _matmul_layers(model, keep_head):
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def float32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in float32 with autocast off: the heads whose outputs PPO reads
    directly (values, rewards) keep float32's 24-bit mantissa instead of bf16's 8. The layer is
    called as a module, so a head sharded on its own (FSDP2) gathers its weights first."""
    with torch.autocast(x.device.type, enabled=False):
        if layer.weight.dtype != torch.float32:  # a head someone stored in bf16
            return layer(x.to(layer.weight.dtype)).float()
        return layer(x.float())


def _float32_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An LM head's forward in float32 (MiniMax-M1, 2025, traced train/inference log-prob gaps
    to the LM head's precision and runs it in fp32); inside the module's own call, so wrappers'
    hooks have gathered its weights."""
    with torch.autocast(x.device.type, enabled=False):
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        return F.linear(x.float(), weight, bias)


def float32_lm_head(model: nn.Module) -> bool:
    """Make the model's output head (an nn.Linear) run in float32 under autocast; returns whether
    it did. The instance's forward is replaced, so generation, `logits_to_keep` and wrappers (PEFT,
    DDP, FSDP2) all go through it, and a deep copy keeps it."""
    head = _output_head(model)
    if not isinstance(head, nn.Linear):
        return False
    head.forward = types.MethodType(_float32_forward, head)
    return True


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout probability 0 everywhere, so the model computes the same in train() as in eval().

    RL needs dropout off (ppo-details 2); setting the probabilities to 0 (TRL does the same for
    nn.Dropout) lets a model run in train mode, which transformers' gradient checkpointing
    requires. Attention modules that read a float `attention_dropout` or `dropout` are zeroed too.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


# Distinct graphs one compiled forward may need in a run: sampling's prefill and decode step, the
# shared-prompt passes with and without gradients, a LoRA policy's reference with its adapters off,
# each with a shape it specialised on. torch's default of 8 falls back to eager before the end.
COMPILED_GRAPHS = 64


def compile_forward(model: nn.Module) -> None:
    """Compile the forward of the Hugging Face model inside `model`'s wrappers (in place, with
    `torch.compile(dynamic=True)`: one graph serves every batch, prompt and response length).
    The first steps spend time compiling; the numbers are the eager forward's up to rounding."""
    import torch._dynamo

    if is_compiled(model):
        return
    config = torch._dynamo.config
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), COMPILED_GRAPHS))
    unwrap(model).compile(dynamic=True)


def is_compiled(model: nn.Module) -> bool:
    return getattr(unwrap(model), "_compiled_call_impl", None) is not None
