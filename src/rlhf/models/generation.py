"""Batched sampling with the KV cache, turning token rows back into text, and chat templates
(text prompts wrapped as a user turn; conversational records rendered to prompt and response text).

Shapes: B batch, P prompt tokens (left-padded), R response tokens (right-padded after EOS).

A hand-written loop instead of `generate`: it samples from exactly `softmax(logits / temperature)`
(no top-k of 50 sneaking in from a generation config, ppo-details 1), takes a seeded
`torch.Generator`, and stops when every row has emitted EOS.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ..core import first_eos_index
from ..data import Message, PreferencePair
from ..errors import ConfigError, InputError
from .forward import accepts_kwarg, position_ids_from_mask, unique_rows
from .lean_decode import decoder_for


def encode_prompts(
    tokenizer, prompts: list[str], max_prompt_tokens: int | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompt ids and mask; returns (ids (B, P), mask (B, P), number truncated).

    Over-long prompts keep their last `max_prompt_tokens` tokens (the text nearest the response).
    """
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    truncated = 0
    if max_prompt_tokens is not None:
        truncated = sum(len(r) > max_prompt_tokens for r in rows)
        rows = [r[-max_prompt_tokens:] for r in rows]
    P = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), P), pad, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(rows), P), dtype=torch.long)  # (B, P)
    for i, row in enumerate(rows):
        if row:
            ids[i, P - len(row) :] = torch.tensor(row)
            mask[i, P - len(row) :] = 1
    return ids.to(device), mask.to(device), truncated


def truncate_prompts(tokenizer, prompts: list[str], max_tokens: int) -> tuple[list[str], int]:
    """Prompts longer than `max_tokens` tokens (counting the tokenizer's BOS) keep their last tokens.

    Returns the prompts, as text, and how many were cut; the cut text encodes to at most about
    `max_tokens` tokens again (byte-level tokenizers can merge differently at the cut).
    """
    n_special = len(tokenizer("")["input_ids"])  # tokens the tokenizer adds itself (BOS)
    keep = max(1, max_tokens - n_special)
    out, cut = [], 0
    for prompt, ids in zip(prompts, tokenizer(prompts)["input_ids"]):
        if len(ids) > max_tokens:
            cut += 1
            body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            prompt = tokenizer.decode(body[-keep:])
        out.append(prompt)
    return out, cut


def apply_chat_template(tokenizer, prompts: list[str], source: str = "the tokenizer") -> list[str]:
    """Each prompt as a user turn of the tokenizer's chat template, ready for the reply.

    A BOS that the template writes is dropped when the tokenizer adds one itself, so it is not
    doubled.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"--chat-template: {source} has no chat template (no chat_template in "
            "tokenizer_config.json or chat_template.jinja); leave the option off"
        )
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        out.append(_drop_template_bos(tokenizer, text))
    return out


def _drop_template_bos(tokenizer, text: str) -> str:
    """`text` without the BOS a template writes when the tokenizer adds its own, so none doubles."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer.bos_token_id in tokenizer("")["input_ids"]
    return text[len(bos) :] if adds_bos and text.startswith(bos) else text


def need_chat_template(tokenizer, data: str, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{data}: holds conversations (lists of messages), which are rendered with a chat "
            f"template, and {source} has none; give a chat model's folder with --model, or text"
        )


def _render(tokenizer, messages: list[Message], where: str, generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception() in templates
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{where}: the chat template refused the conversation: {reason}") from None


def _end_at_eos(tokenizer, response: str) -> str:
    """A rendered reply without the EOS that closes its turn (and what the template writes after
    it, such as a newline): the reward model appends EOS itself, so it is trained on the tokens
    PPO scores, a sampled reply up to and including its EOS. A turn closed by another marker is
    left as it is."""
    eos = tokenizer.eos_token
    body = response.rstrip()
    return body[: -len(eos)] if eos and body.endswith(eos) else response


def render_messages(
    tokenizer, messages: list[Message], where: str, generation_prompt: bool = False
) -> str:
    """A conversation as the chat template writes it (ready for the next reply with
    `generation_prompt`), without a BOS that the tokenizer adds itself; `where` names the record
    in a refusal's message."""
    return _drop_template_bos(tokenizer, _render(tokenizer, messages, where, generation_prompt))


def render_conversation_pairs(
    tokenizer, pairs: list[PreferencePair], data: str, source: str = "the tokenizer"
) -> list[PreferencePair]:
    """Conversational pairs as text: the prompt as the template writes it before a reply (with the
    generation prompt), each response as the text the template writes for the turn(s) after it.

    `data` (the file) and `source` (whose tokenizer) are for the messages.
    """
    need_chat_template(tokenizer, data, source)
    out = []
    for pair in pairs:
        where = pair.source or data
        prompt = _render(tokenizer, pair.prompt, where, True)
        chosen = _render(tokenizer, pair.prompt + pair.chosen, where, False)
        rejected = _render(tokenizer, pair.prompt + pair.rejected, where, False)
        # The prompt is what all three share: a few templates write the generation prompt
        # differently when a reply follows (TRL's data_utils.apply_chat_template does the same).
        n = len(os.path.commonprefix([prompt, chosen, rejected]))
        chosen, rejected = (_end_at_eos(tokenizer, text[n:]) for text in (chosen, rejected))
        if chosen == rejected:
            raise InputError(f"{where}: chosen and rejected render to the same text")
        text = _drop_template_bos(tokenizer, prompt[:n])
        out.append(PreferencePair(text, chosen, rejected, pair.margin, pair.source))
    return out


def render_prompt_conversations(
    tokenizer, prompts: list[list[Message]], data: str, source: str = "the tokenizer"
) -> list[str]:
    """Prompts given as conversations, rendered by the chat template ready for the reply."""
    need_chat_template(tokenizer, data, source)
    return [
        _drop_template_bos(
            tokenizer, _render(tokenizer, messages, f"{data}: prompt {i} (0-based)", True)
        )
        for i, messages in enumerate(prompts)
    ]


def pad_right(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask for whole sequences (training and scoring, not generation)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)  # (B, V)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _sample(
    probs: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of probs (B, V) by inverting the CDF with one uniform draw per row.

    `torch.multinomial` draws a random number for every entry of the vocabulary; one per row is
    enough. The cumulative sum runs in float64 so that large vocabularies keep their tails, and the
    draw is scaled by the row's total so a zero-probability token can never be picked. `u` (B,)
    supplies the draws; otherwise they come from `generator`.
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    if u is None:
        u = torch.rand(
            probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64
        )
    u = u.to(device=probs.device, dtype=torch.float64).unsqueeze(-1)  # (B, 1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    return token.clamp_(max=probs.shape[-1] - 1).squeeze(-1)  # (B,)


def preallocate_cache(cache, extra: int, rows: torch.Tensor | None = None) -> bool:
    """Give each layer of a transformers `DynamicCache` room for `extra` more positions, written
    in place, so decoding does not copy the whole cache at every token (`DynamicLayer.update`
    concatenates: at long responses that copying is a large share of sampling). Each layer's keys
    and values become views of the filled part of its buffer, so attention still reads only the
    positions filled so far. `rows` (B,), if given, picks the cache row of each new batch row.
    Returns False, leaving the cache as it is, for any cache that is not made of plain growing
    layers (sliding windows, quantised or recurrent caches, older transformers): those keep
    concatenating.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    if not layers or any(
        type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers
    ):
        return False
    for layer in layers:
        old_keys, old_values = layer.keys, layer.values
        if rows is not None:
            old_keys, old_values = old_keys[rows], old_values[rows]
        n = old_keys.shape[-2]
        shape = list(old_keys.shape)
        shape[-2] = n + extra
        keys = old_keys.new_empty(shape)  # (B, heads, n + extra, head_dim)
        values = old_values.new_empty(shape[:-1] + [old_values.shape[-1]])
        keys[..., :n, :] = old_keys
        values[..., :n, :] = old_values
        layer.keys, layer.values = keys[..., :n, :], values[..., :n, :]

        def update(key_states, value_states, *args, _layer=layer, _k=keys, _v=values, **kwargs):
            start, m = _layer.keys.shape[-2], key_states.shape[-2]
            _k[..., start : start + m, :] = key_states
            _v[..., start : start + m, :] = value_states
            _layer.keys, _layer.values = _k[..., : start + m, :], _v[..., : start + m, :]
            return _layer.keys, _layer.values

        layer.update = update
    return True


@torch.no_grad()
def sample_responses(
    lm: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    all_done: Callable[[bool], bool] | None = None,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations; returns response ids (B, R), pad after each row's first EOS, and
    with `return_logprobs` also the log-probability (B, R) of each sampled token under the
    distribution it was drawn from (after the temperature; 0 after EOS).

    `uniforms` (B, max_new_tokens), if given, holds the random draw for each row and position, so a
    row's sample does not depend on which other rows share its batch, how the batch is chunked or
    over how many processes it is spread (the draws are made for the whole global batch up front).
    `all_done(local_done)` decides when to stop; a sharded model (FSDP) passes one that agrees
    across processes, so that every process keeps running forward passes, and the all-gathers
    inside them, until the last process is done.
    """
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    mask = prompt_mask.clone()  # (B, P)
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40).
    cache_arg = "cache" if accepts_kwarg(lm, "cache") else "past_key_values"
    # Only the last prompt position's logits are needed: (B, 1, V), not (B, P, V).
    keep = {"logits_to_keep": 1} if accepts_kwarg(lm, "logits_to_keep") else {}

    def prefill(rows: torch.Tensor):
        return lm(
            input_ids=prompt_ids[rows], attention_mask=mask[rows],
            position_ids=position_ids_from_mask(mask[rows]), use_cache=True, **keep,
        )  # fmt: skip

    # A prompt sampled several times (a GRPO group) runs through the model once; its cache rows
    # are then copied for each of its samples.
    rows, inverse = unique_rows(torch.cat([prompt_ids, mask], 1))  # (U,), (B,)
    out = prefill(rows)
    if not preallocate_cache(out[cache_arg], max_new_tokens, inverse):
        if len(rows) < B:  # a cache that cannot be copied row by row: prefill every row
            out = prefill(torch.arange(B, device=device))
        inverse = None
    logits = out.logits[:, -1, :] if inverse is None else out.logits[inverse, -1, :]  # (B, V)
    cache = out[cache_arg]
    # The lean step writes the cache through its layers, so only a cache made ready in place here.
    lean = decoder_for(lm) if inverse is not None else None
    P = mask.shape[1]
    # The mask for every position up front: each step shows the model one more column of it.
    full_mask = torch.cat(
        [mask, torch.ones((B, max_new_tokens), dtype=mask.dtype, device=device)], dim=1
    )  # (B, P+R)
    next_position = mask.sum(-1, keepdim=True)  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        logits = logits.float()  # (B, V)
        if temperature != 1.0:
            logits = logits / temperature
        logits = _filter_logits(logits, top_k, top_p)
        u = uniforms[:, t] if uniforms is not None else None  # (B,)
        probs = logits.softmax(-1)  # (B, V)
        token = _sample(probs, generator, u)  # (B,)
        if return_logprobs:
            logp = probs.gather(-1, token[:, None]).squeeze(-1).log()  # (B,)
            logprobs.append(torch.where(done, torch.zeros_like(logp), logp))
        token = torch.where(done, torch.full_like(token, pad_token_id), token)  # (B,)
        tokens.append(token)
        done = done | (token == eos_token_id)
        local_done = bool(done.all())
        if (
            all_done(local_done) if all_done is not None else local_done
        ) or t == max_new_tokens - 1:
            break
        step_mask = full_mask[:, : P + t + 1]  # (B, P+t+1)

        def forward(token=token, step_mask=step_mask, position=next_position):
            return lm(
                input_ids=token[:, None], attention_mask=step_mask, position_ids=position,
                use_cache=True, **{cache_arg: cache},
            ).logits[:, -1, :]  # fmt: skip

        if lean is not None:  # the same modules without the forward's bookkeeping (lean_decode)
            logits = lean.step(token, step_mask, next_position, cache, forward)
        else:
            logits = forward()  # (B, V)
        next_position = next_position + 1
    response = torch.stack(tokens, dim=1)  # (B, R)
    return (response, torch.stack(logprobs, dim=1)) if return_logprobs else response


def response_lengths(
    response_ids: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Length of each response including its first EOS, and whether it has one: (B,), (B,)."""
    first = first_eos_index(response_ids, eos_token_id)  # (B,), R where there is no EOS
    ended = first < response_ids.shape[1]  # (B,)
    return torch.where(ended, first + 1, first), ended


def decode_responses(
    tokenizer, response_ids: torch.Tensor, eos_token_id: int
) -> tuple[list[str], list[bool]]:
    """Text of each response up to (not including) its first EOS, and whether it ended."""
    lengths, ended = response_lengths(response_ids, eos_token_id)
    texts = []
    for row, n, e in zip(response_ids.tolist(), lengths.tolist(), ended.tolist()):
        body = row[: n - 1] if e else row[:n]
        texts.append(tokenizer.decode(body, skip_special_tokens=True).strip())
    return texts, ended.tolist()


@torch.no_grad()
def sample_texts(
    lm: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[list[str], list[bool]]:
    """Convenience wrapper: prompts in, (response texts, ended flags) out."""
    texts, ended = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask, _ = encode_prompts(tokenizer, chunk, device=device)
        out = sample_responses(
            lm,
            ids,
            mask,
            max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            temperature=temperature,
            generator=generator,
        )
        t, e = decode_responses(tokenizer, out, tokenizer.eos_token_id)
        texts += t
        ended += e
    return texts, ended
