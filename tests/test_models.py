"""RewardModel: pooling, padding invariance, freezing, head init, save/load; the BT loss by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhf.models.forward import last_token_index, position_ids_from_mask
from rlhf.models.policy import PolicyWithValueHead
from rlhf.models.reward_model import RewardModel
from rlhf.reward.loss import reward_model_loss


def _pad(rows, pad_id, side):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def test_last_token_index_and_positions():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert position_ids_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 0]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reward_is_the_same_under_left_and_right_padding(tiny_tokenizer, arch):
    from conftest import make_tiny_lm

    rm = RewardModel(make_tiny_lm(tiny_tokenizer, arch)).eval()
    rows = [
        tiny_tokenizer(t)["input_ids"]
        for t in ["the plot was dull .", "great", "the phone is great ."]
    ]
    alone = torch.cat([rm(torch.tensor([r])) for r in rows])  # no padding at all
    for side in ("left", "right"):
        ids, mask = _pad(rows, tiny_tokenizer.pad_token_id, side)
        assert rm(ids, mask).shape == (3,)
        torch.testing.assert_close(rm(ids, mask), alone, atol=1e-5, rtol=1e-5)


def test_head_hidden_size(tiny_lm):
    rm = RewardModel(tiny_lm)
    assert rm.reward_head.in_features == tiny_lm.config.n_embd == 32
    assert torch.all(rm.reward_head.bias == 0)


def test_head_init_is_normal_with_std_one_over_sqrt_d_plus_1():
    # d = 1023: std 1/sqrt(1024) = 1/32 = 0.03125. The sample std of 1023 draws has a relative
    # standard error of 1/sqrt(2 * 1022) = 2.2%, so +-10% is 4.5 standard errors. PyTorch's default
    # Linear init, U(-1/sqrt(d), 1/sqrt(d)), has std 1/sqrt(3d) = 0.0181 and is far outside.
    torch.manual_seed(0)
    rm = RewardModel(OneHotLM(1023))
    w = rm.reward_head.weight.detach().flatten()  # (1023,)
    assert torch.all(rm.reward_head.bias == 0)
    assert 0.9 / 32 < w.std().item() < 1.1 / 32
    assert abs(w.mean().item()) < 4 / 32 / math.sqrt(1023)  # 4 standard errors of the mean
    # Normal, not uniform: about 4.6% of normal draws lie beyond 2 std; a uniform has none.
    assert (w.abs() > 2 / 32).float().mean().item() > 0.02


def test_frozen_base_gets_no_gradient(tiny_lm, tiny_tokenizer):
    rm = RewardModel(tiny_lm, freeze_base=True, tokenizer=tiny_tokenizer)
    loss = reward_model_loss(rm, "the plot was", "superb .", "dull .", "A")
    loss.backward()
    assert all(p.grad is None for p in rm.base_model.parameters())
    assert rm.reward_head.weight.grad is not None and rm.reward_head.weight.grad.abs().sum() > 0


def test_unfrozen_base_gets_gradient(tiny_lm, tiny_tokenizer):
    rm = RewardModel(tiny_lm, freeze_base=False, tokenizer=tiny_tokenizer)
    reward_model_loss(
        rm, ["a", "b"], ["superb .", "ok ."], ["dull .", "bad ."], ["A", "B"]
    ).backward()
    grads = [p.grad for p in rm.base_model.transformer.h[0].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


class OneHotLM(nn.Module):
    """A stand-in base model whose last hidden state is the one-hot of the token id, so the head's
    weight vector is simply a table of reward per final token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=vocab)
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(
            last_hidden_state=nn.functional.one_hot(input_ids, self.vocab).float()
        )


def _table_reward_model(table):
    rm = RewardModel(OneHotLM(len(table)))
    with torch.no_grad():
        rm.reward_head.weight.copy_(torch.tensor([table]))
        rm.reward_head.bias.zero_()
    return rm


def test_bradley_terry_loss_by_hand():
    rm = _table_reward_model([0.0, 1.0, 2.0])  # reward = 0, 1 or 2 by the last real token
    a = _pad([[1, 2], [1, 1, 1]], 0, "right")  # last tokens 2 and 1 -> rewards 2, 1
    b = _pad([[2, 1, 1], [2, 0]], 0, "right")  # last tokens 1 and 0 -> rewards 1, 0
    # pair 1: A preferred, r_A - r_B = 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.31326
    # pair 2: B preferred, r_B - r_A = 0 - 1 = -1 -> -log sigmoid(-1) = log(1 + e) = 1.31326
    loss = reward_model_loss(rm, None, a, b, ["A", "B"])
    assert loss.item() == pytest.approx((0.31326 + 1.31326) / 2, abs=1e-5)
    # a margin of 1 on pair 1: -log sigmoid(1 - 1) = log 2 = 0.69315
    single_a = (a[0][:1], a[1][:1])
    single_b = (b[0][:1], b[1][:1])
    assert reward_model_loss(rm, None, single_a, single_b, "A", margin=1.0).item() == pytest.approx(
        math.log(2), abs=1e-6
    )
    # soft label P(A)=0.5 on pair 1: 0.5 * 0.31326 + 0.5 * 1.31326 = 0.81326
    soft = reward_model_loss(rm, None, single_a, single_b, torch.tensor([0.5]))
    assert soft.item() == pytest.approx(0.81326, abs=1e-5)


def test_normalisation_gives_mean_zero_std_one(tiny_lm):
    rm = RewardModel(tiny_lm)
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    rm.set_normalisation(raw)
    normalised = rm.reward_gain * raw + rm.reward_bias
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normalised.std().item() == pytest.approx(1.0, abs=1e-6)


def test_reward_model_round_trip(tmp_path, tiny_lm, tiny_tokenizer):
    rm = RewardModel(tiny_lm, tokenizer=tiny_tokenizer).eval()
    rm.set_normalisation(torch.tensor([0.5, 1.5, 2.0]))
    rm.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    ids, mask = _pad(
        [tiny_tokenizer("the plot was dull .")["input_ids"]], tiny_tokenizer.pad_token_id, "right"
    )
    torch.testing.assert_close(loaded(ids, mask), rm(ids, mask))


@pytest.mark.parametrize("side", ["left", "right"])
def test_value_model_from_the_reward_model_starts_at_the_normalised_reward(tiny_tokenizer, side):
    from conftest import make_tiny_lm
    from rlhf.models.policy import ValueModel

    rm = RewardModel(make_tiny_lm(tiny_tokenizer, seed=3)).eval()
    rm.set_normalisation(torch.tensor([0.3, 0.5, 0.9]))  # gain 3.2733, bias -1.8549: not 1 and 0
    assert abs(rm.reward_gain.item() - 1) > 1 and abs(rm.reward_bias.item()) > 1
    rows = [tiny_tokenizer(t)["input_ids"] for t in ["the plot was dull .", "great", "the phone ."]]
    ids, mask = _pad(rows, tiny_tokenizer.pad_token_id, side)
    with torch.no_grad():
        rewards = rm(ids, mask)  # (B,)
        value_model = ValueModel.from_reward_model(rm).eval()
        values = value_model(ids, mask)  # (B, T)
        after = rm(ids, mask)  # (B,)
    last = last_token_index(mask)  # (B,)
    torch.testing.assert_close(values[torch.arange(3), last], rewards, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, rewards)  # the reward model's own head is not scaled


def test_value_head_starts_at_zero(tiny_lm, tiny_tokenizer):
    policy = PolicyWithValueHead(tiny_lm)
    ids, mask = _pad([[5, 6, 7], [8, 9]], tiny_tokenizer.pad_token_id, "left")
    logits, values = policy(ids, mask)
    assert logits.shape == (2, 3, len(tiny_tokenizer)) and values.shape == (2, 3)
    assert torch.all(values == 0)


def test_heads_are_created_beside_the_trunk(tiny_tokenizer):
    # A model already on the GPU must get its heads there too (PPOTrainer wraps the policy it is
    # given); "meta" stands in for a device other than the CPU.
    from conftest import make_tiny_lm

    on_meta = RewardModel(make_tiny_lm(tiny_tokenizer).to("meta"))
    assert {p.device.type for p in on_meta.reward_head.parameters()} == {"meta"}
    assert {b.device.type for b in on_meta.buffers()} == {"meta"}
    policy = PolicyWithValueHead(make_tiny_lm(tiny_tokenizer).to("meta"))
    assert {p.device.type for p in policy.value_head.parameters()} == {"meta"}


def test_swap_slow_gelu_keeps_the_function_and_the_saved_model(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_lm
    from rlhf.models.forward import swap_slow_gelu

    lm = make_tiny_lm(tiny_tokenizer).eval()
    ids = torch.randint(0, len(tiny_tokenizer), (3, 9))
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    assert swap_slow_gelu(lm) == lm.config.n_layer
    assert swap_slow_gelu(lm) == 0  # nothing left to swap
    with torch.no_grad():
        after = lm(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    lm.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.activation_function == "gelu_new"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_policy_logits_to_keep_are_the_last_positions(tiny_tokenizer, arch):
    from conftest import make_tiny_lm

    policy = PolicyWithValueHead(make_tiny_lm(tiny_tokenizer, arch)).eval()
    ids, mask = _pad([[5, 6, 7, 8, 9], [5, 6, 7]], tiny_tokenizer.pad_token_id, "left")
    with torch.no_grad():
        full_logits, full_values = policy(ids, mask)
        kept_logits, kept_values = policy(ids, mask, logits_to_keep=3)
    assert kept_logits.shape == (2, 3, full_logits.shape[-1])
    torch.testing.assert_close(kept_logits, full_logits[:, -3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(kept_values, full_values)


# ----- sampling: the preallocated cache and the shared prefill --------------------------------
def test_unique_rows_by_hand():
    from rlhf.models.generation import unique_rows

    x = torch.tensor([[3, 1], [0, 0], [3, 1], [3, 1], [0, 0], [5, 5]])
    first, which = unique_rows(x)
    # Distinct rows in order of first appearance: [3, 1] (row 0), [0, 0] (row 1), [5, 5] (row 5).
    assert first.tolist() == [0, 1, 5]
    assert which.tolist() == [0, 1, 0, 0, 1, 2]
    assert torch.equal(x[first][which], x)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_with_preallocated_cache_matches_concatenation(
    tiny_tokenizer, monkeypatch, arch, dtype
):
    """Writing the cache in place and running each distinct prompt once give the tokens that
    the concatenating cache with every row prefilled gives, rows of different lengths included."""
    import rlhf.models.generation as generation
    from conftest import make_eos_biased_lm

    lm = make_eos_biased_lm(tiny_tokenizer, arch, bias=3.0)
    prompts = [p for p in ["the film was", "a", "I thought the acting"] for _ in range(3)]
    ids, mask, _ = generation.encode_prompts(tiny_tokenizer, prompts)
    u = torch.rand(
        (len(prompts), 12), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    tok = tiny_tokenizer

    def sample():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return generation.sample_responses(
                lm, ids, mask, 12, tok.eos_token_id, tok.pad_token_id, uniforms=u
            )

    calls = []
    real = generation.preallocate_cache
    monkeypatch.setattr(
        generation, "preallocate_cache", lambda *a: calls.append(real(*a)) or calls[-1]
    )
    fast = sample()
    assert calls == [True]
    monkeypatch.setattr(generation, "preallocate_cache", lambda *a: False)
    slow = sample()
    assert torch.equal(fast, slow)
    lengths = (fast != tok.pad_token_id).sum(1)
    assert len(set(lengths.tolist())) > 1  # some rows ended early


def test_preallocated_layer_returns_what_concatenation_returns():
    from transformers.cache_utils import DynamicCache

    from rlhf.models.generation import preallocate_cache

    cache, reference = DynamicCache(), DynamicCache()
    k0, v0 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)  # (B, heads, positions, head_dim)
    cache.update(k0, v0, 0)
    reference.update(k0, v0, 0)
    rows = torch.tensor([1, 0, 1])  # three new rows: old row 1, row 0, row 1 again
    assert preallocate_cache(cache, 3, rows)
    reference.layers[0].keys = reference.layers[0].keys[rows]
    reference.layers[0].values = reference.layers[0].values[rows]
    for _ in range(3):
        k, v = torch.randn(3, 3, 1, 5), torch.randn(3, 3, 1, 5)
        got, want = cache.update(k, v, 0), reference.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cache.get_seq_length() == reference.get_seq_length() == 7


def test_preallocation_leaves_other_caches_alone():
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from rlhf.models.generation import preallocate_cache

    cache = DynamicCache()
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    cache.update(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), 0)
    before = cache.layers[0].keys
    assert not preallocate_cache(cache, 3)
    assert cache.layers[0].keys is before
    assert not preallocate_cache(object(), 3)  # no layers at all (an older transformers)


# ----- forward passes that run a shared prompt once -------------------------------------------
def _grouped_rows(tokenizer, R: int = 6):
    from rlhf.models.generation import encode_prompts

    prompts = [p for p in ["the film was", "a", "I thought the acting"] for _ in range(3)]
    ids, mask, _ = encode_prompts(tokenizer, prompts)  # (9, P), left-padded
    response = torch.randint(3, len(tokenizer), (9, R), generator=torch.Generator().manual_seed(0))
    response_mask = torch.ones(9, R, dtype=torch.long)
    response_mask[0, 4:] = 0  # one row ends early
    return torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1), ids.shape[1]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompt_forward_matches_the_whole_rows(tiny_tokenizer, arch, dtype):
    """Logits and gradients with each distinct prompt run once equal the one-pass forward's."""
    from conftest import make_tiny_lm
    from rlhf.models.forward import position_ids_from_mask, shared_prompt_logits

    lm = make_tiny_lm(tiny_tokenizer, arch)
    ids, mask, P = _grouped_rows(tiny_tokenizer)
    R = ids.shape[1] - P
    tol = 1e-5 if dtype == torch.float32 else 3e-2

    def loss_and_grads(shared: bool):
        lm.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if shared:
                logits = shared_prompt_logits(lm, ids, mask, P, R + 1)
            else:
                logits = lm(
                    input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    logits_to_keep=R + 1,
                ).logits  # fmt: skip
        logp = logits.float().log_softmax(-1)  # (9, R+1, V)
        loss = logp[:, :-1].gather(-1, ids[:, P:, None]).squeeze(-1)[mask[:, P:].bool()].sum()
        loss.backward()
        return logp.detach(), [p.grad.clone() for p in lm.parameters()]

    whole, whole_grads = loss_and_grads(False)
    shared, shared_grads = loss_and_grads(True)
    assert shared.shape == whole.shape
    torch.testing.assert_close(shared, whole, atol=tol, rtol=tol)
    for a, b in zip(shared_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)


def test_shared_prompt_forward_declines_where_it_cannot_help(tiny_tokenizer):
    from conftest import make_tiny_lm
    from rlhf.models.forward import shared_prompt_logits

    lm = make_tiny_lm(tiny_tokenizer, "llama")
    ids, mask, P = _grouped_rows(tiny_tokenizer)
    distinct = [0, 3, 6]  # one row of each prompt: nothing to share
    assert shared_prompt_logits(lm, ids[distinct], mask[distinct], P, 3) is None
    # Its training forward drops the cache (transformers 5 renamed the switch).
    enable = (
        getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    )
    enable()
    assert shared_prompt_logits(lm, ids, mask, P, 3) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
def test_grpo_step_is_the_same_with_shared_prompt_passes(tiny_tokenizer, one_pass, dtype):
    """A GRPO step (4 samples per prompt) with the reference and update passes sharing each
    prompt's forward pass gives the step and the weights of the whole-row passes, and its first
    ratio is still 1."""
    import copy

    from conftest import PROMPTS, make_eos_biased_lm, make_tiny_lm
    from rlhf.models.reward_model import RewardModel
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.trainer import PPOTrainer

    policy = make_eos_biased_lm(tiny_tokenizer, "llama", bias=2.0)
    reward = RewardModel(make_tiny_lm(tiny_tokenizer, "llama", seed=2), tokenizer=tiny_tokenizer)
    cfg = PPOConfig(
        batch_size=2, samples_per_prompt=4, minibatch_size=8 if one_pass else 4,
        ppo_epochs=1 if one_pass else 2, response_tokens=8, lr=1e-3, dtype=dtype,
        advantage_estimator="grpo",
    )  # fmt: skip
    runs = {}
    for shared in (True, False):
        p = copy.deepcopy(policy)
        t = PPOTrainer(
            p, copy.deepcopy(policy), copy.deepcopy(reward), tiny_tokenizer, copy.deepcopy(cfg)
        )
        t.share_prompts = shared
        assert t.one_pass == one_pass
        runs[shared] = (t.step(PROMPTS[:2]), p)
    (m_on, p_on), (m_off, p_off) = runs[True], runs[False]
    assert m_on["policy/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    # bf16: the two layouts round differently (1% on the step's statistics, as the other bf16
    # comparisons of this suite allow); the weights move by lr-sized steps either way.
    rel, abs_ = (1e-4, 1e-6) if dtype == "float32" else (1e-2, 1e-3)
    for key in ("objective/kl", "loss/policy", "policy/entropy", "policy/approxkl"):
        assert m_on[key] == pytest.approx(m_off[key], rel=rel, abs=abs_), key
    # Adam moves each weight by at most about lr per step whatever the gradient's size, so a bf16
    # gradient entry near 0 whose sign the rounding flips differs by up to 2 lr per step.
    w_tol = (1e-5, 1e-4) if dtype == "float32" else (2 * cfg.lr * cfg.ppo_epochs + 1e-5, 0)
    for a, b in zip(p_on.parameters(), p_off.parameters()):
        torch.testing.assert_close(a, b, atol=w_tol[0], rtol=w_tol[1])
