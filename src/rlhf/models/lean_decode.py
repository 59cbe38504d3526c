"""One decode step of a causal LM without transformers' per-call machinery.

Shapes: B rows, S positions in the cache after this step, V vocabulary, H hidden size.

Sampling runs the model once per token on one new position per row. Around the layers' own work,
transformers' forward builds the attention mask, passes every call through its decorators, keyword
handling and output classes. `LeanDecoder` runs the model's own modules in the forward's order:
its norms, projections (LoRA adapters included, they live inside the projections), rotary
embedding, dropout, attention function and cache. Its logits are therefore the forward's bit for
bit, and `sample_responses` checks that on the first step of each kind of batch (padded or not,
dtype, device, autocast): if they differ at all, that model keeps the forward. Sampling gains
1.02-1.12x on the CPU (`benchmarks/bench_lean_decode.py`).

Families it knows: Llama, Mistral, Qwen2, Qwen3 (decoder layers of norm, attention, norm, MLP with
rotary embeddings) and GPT-2. Anything else (other architectures, a cache past a sliding window,
FSDP-sharded modules, attention kernels other than SDPA and eager, a forward compiled by
`--compile`) keeps the forward. `RLHF_LEAN_DECODE=0` turns it off.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .forward import is_compiled, unwrap

ROTARY_FAMILY = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
GPT2_FAMILY = {"GPT2LMHeadModel"}
ATTENTION_KINDS = {"sdpa", "eager"}

# Per model: its decoder, or None where it has none. Weak keys: a model that is freed takes its
# entry with it.
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


OFF = {"0", "false", "no", "off"}


def enabled() -> bool:
    return os.environ.get("RLHF_LEAN_DECODE", "1").strip().lower() not in OFF


def decoder_for(lm: nn.Module) -> LeanDecoder | None:
    """The lean decoder of `lm` (made once per model), or None where it does not apply."""
    if not enabled() or is_compiled(lm):  # a compiled forward is the faster one
        return None
    if lm not in _decoders:
        _decoders[lm] = LeanDecoder.build(lm)
    return _decoders[lm]


def _window(config) -> int | None:
    """The sliding window every layer attends within (None: no window); -1 where the layers mix
    windowed and full attention, which the lean step does not do."""
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return -1
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


class LeanDecoder:
    """The decode step of one model; `build` returns None for a model it does not know."""

    def __init__(self, model: nn.Module, family: str, window: int | None = None):
        # The transformers model inside any wrappers, held weakly: the decoder is the value of a
        # weak-key entry whose key may be this very model, which a strong reference keeps alive.
        self._model, self.family = weakref.ref(model), family
        self.config = model.config
        self.window = window  # past it the forward's mask is a sliding one: the forward runs
        self.verdicts: dict[tuple, bool] = {}  # (padded, dtype, device, autocast) -> checked equal
        # The functions of the model's own modeling file, looked up once, not at every layer.
        self.modeling = sys.modules[type(model).__module__]
        self.attention_functions: dict[str, Callable] = {}  # attention implementation -> function

    @property
    def model(self) -> nn.Module:
        return self._model()

    @classmethod
    def build(cls, lm: nn.Module) -> LeanDecoder | None:
        model = unwrap(lm)
        name = type(model).__name__
        config = getattr(model, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) not in ATTENTION_KINDS:
            return None
        if any(type(m).__name__.startswith("FSDP") for m in model.modules()):
            return None  # a sharded module gathers its weights in its own forward hooks
        window = _window(config)
        if name in ROTARY_FAMILY and window != -1:
            body = getattr(model, "model", None)
            if all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
                return cls(model, "rotary", window)
        if name in GPT2_FAMILY and not getattr(config, "add_cross_attention", False):
            return cls(model, "gpt2")
        return None

    # ----- the step ----------------------------------------------------------------------
    def step(
        self,
        token: torch.Tensor,
        attention_mask: torch.Tensor,
        position: torch.Tensor,
        cache,
        forward: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Logits (B, V) after feeding `token` (B,) at `position` (B, 1).

        `attention_mask` (B, S) is the mask the forward would get; `cache` is the forward's cache,
        written in place as the forward writes it. `forward()` runs the model's own forward on the
        same inputs and returns its logits (B, V): the first step of each kind of batch runs both
        and compares them, and a model whose lean logits differ keeps the forward.
        """
        if self.window is not None and attention_mask.shape[-1] > self.window:
            return forward()
        padded = not bool(attention_mask.all())
        device = token.device
        key = (padded, next(self.model.parameters()).dtype, device,
               torch.is_autocast_enabled(device.type))  # fmt: skip
        verdict = self.verdicts.get(key)
        if verdict is False:
            return forward()
        mask = attention_mask[:, None, None, :].bool() if padded else None  # (B, 1, 1, S)
        if verdict is None:
            lengths = [(layer.keys.shape[-2], layer.values.shape[-2]) for layer in cache.layers]
            try:
                lean = self._logits(token, mask, position, cache)
            except Exception:  # a module laid out otherwise than the family's: keep the forward
                lean = None
            for layer, (nk, nv) in zip(cache.layers, lengths):  # undo this step's cache write
                layer.keys, layer.values = layer.keys[..., :nk, :], layer.values[..., :nv, :]
            reference = forward()
            self.verdicts[key] = lean is not None and torch.equal(lean, reference)
            return reference
        return self._logits(token, mask, position, cache)

    def _logits(self, token, mask, position, cache) -> torch.Tensor:
        if self.family == "rotary":
            hidden = self._rotary(token, mask, position, cache)  # (B, 1, H)
        else:
            hidden = self._gpt2(token, mask, position, cache)
        return self.model.lm_head(hidden)[:, -1, :]  # (B, V)

    def _attention(self, attn, q, k, v, mask, cache):
        """The model's own attention function over the cache, as its attention module calls it."""
        k, v = cache.layers[attn.layer_idx].update(k, v)  # (B, kv heads, S, head dim)
        kind = self.config._attn_implementation
        function = self.attention_functions.get(kind)
        if function is None:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            if getattr(attn, "reorder_and_upcast_attn", False):
                raise NotImplementedError("GPT-2's reordered attention")
            # Its forward's default where the implementation is not registered: eager.
            function = ALL_ATTENTION_FUNCTIONS.get_interface(
                kind, self.modeling.eager_attention_forward
            )
            self.attention_functions[kind] = function
        out, _ = function(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        return out.reshape(*out.shape[:-2], -1).contiguous()  # (B, 1, heads x head dim)

    def _rotary(self, token, mask, position, cache):
        apply_rotary_pos_emb = self.modeling.apply_rotary_pos_emb  # the family's own
        body = self.model.model
        x = body.embed_tokens(token[:, None])  # (B, 1, H)
        cos, sin = body.rotary_emb(x, position_ids=position)
        for layer in body.layers[: self.config.num_hidden_layers]:
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            shape = (*h.shape[:-1], -1, attn.head_dim)
            q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's queries and keys
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            x = x + attn.o_proj(self._attention(attn, q, k, v, mask, cache))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return body.norm(x)

    def _gpt2(self, token, mask, position, cache):
        body = self.model.transformer
        x = body.drop(body.wte(token[:, None]) + body.wpe(position))  # (B, 1, H)
        for block in body.h:
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
            q, k, v = (t.view(*t.shape[:-1], -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            x = x + attn.resid_dropout(attn.c_proj(self._attention(attn, q, k, v, mask, cache)))
            x = x + block.mlp(block.ln_2(x))
        return body.ln_f(x)
