"""`rlhf dpo` on a tiny model: encoding, sequence log-probs, a run that learns, the CLI and bad input.

The preference data is synthetic and learnable: the chosen reply always says "great" where the
rejected one says "dull", and the rest is shared, so pairs held out of training test the same
preference on prompts and endings the model was not trained on.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from rlhf.cli import main
from rlhf.reward.preferences import Pairs
from rlhf.rl.dpo import DPOConfig, encode_pairs, sample_gold_and_kl, sequence_logps, train_dpo

SUBJECTS = ["the acting", "the phone", "the story", "the blender", "the film", "the battery",
            "the plot", "the headphones"]  # fmt: skip
ENDINGS = ["and it works well .", "and i loved it .", "and the story was moving .",
           "but it is loud .", "and it lasts all day ."]  # fmt: skip


def _write_pairs(path) -> None:
    with open(path, "w") as f:
        for subject, ending in itertools.product(SUBJECTS, ENDINGS):
            record = {
                "prompt": f"{subject} was",
                "chosen": f"great {ending}",
                "rejected": f"dull {ending}",
            }
            f.write(json.dumps(record) + "\n")


def _config(tmp_path, tiny_model_dir, **changes) -> DPOConfig:
    data = tmp_path / "prefs.jsonl"
    _write_pairs(data)
    fields = dict(
        out=str(tmp_path / "dpo"), data=str(data), model=str(tiny_model_dir), epochs=3,
        batch_size=8, lr=3e-3, eval_fraction=0.25, eval_samples=16, eval_response_tokens=8,
    )  # fmt: skip
    return DPOConfig(**(fields | changes))


def test_encode_pairs_masks_the_prompt_and_keeps_the_response_and_eos(tiny_tokenizer) -> None:
    pairs = Pairs(["the phone was"], ["great and it works well ."], ["dull ."], [None])
    (chosen,), (rejected,), cut = encode_pairs(tiny_tokenizer, pairs, max_length=64)
    assert cut == 0
    for (ids, response), text in ((chosen, "great and it works well ."), (rejected, "dull .")):
        kept = [t for t, m in zip(ids, response) if m]
        assert kept[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(kept[:-1]).strip() == text
        masked = [t for t, m in zip(ids, response) if not m]
        assert tiny_tokenizer.decode(masked, skip_special_tokens=True).strip() == "the phone was"
    # Too long: the prompt goes first; the first kept token is context, never a scored token.
    ((ids, response),), _, cut = encode_pairs(tiny_tokenizer, pairs, len(chosen[0]) - 2)
    assert cut == 1 and len(ids) == len(chosen[0]) - 2
    assert response[0] == 0 and sum(response) == sum(chosen[1])


def test_sequence_logps_sum_the_response_tokens_and_ignore_padding(tiny_tokenizer, tiny_lm) -> None:
    pairs = Pairs(["the phone was", "the plot"], ["great .", "dull and the ending felt weak ."],
                   ["dull .", "moving ."], [None, None])  # fmt: skip
    chosen, rejected, _ = encode_pairs(tiny_tokenizer, pairs, max_length=64)
    rows = chosen + rejected
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        batch, lengths = sequence_logps(tiny_lm, rows, pad, None)  # (4,), (4,)
        for i, (ids, response) in enumerate(rows):
            alone, n = sequence_logps(tiny_lm, [(ids, response)], pad, None)
            logits = tiny_lm(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
            logp = torch.log_softmax(logits, -1)
            by_hand = sum(logp[t - 1, ids[t]] for t in range(len(ids)) if response[t])
            torch.testing.assert_close(batch[i], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch[i], by_hand, atol=1e-5, rtol=1e-5)
            assert lengths[i] == n[0] == sum(response)


def test_dpo_run_learns_a_preference_that_holds_on_held_out_pairs(tmp_path, tiny_model_dir) -> None:
    cfg = _config(tmp_path, tiny_model_dir, gold=True)
    result = train_dpo(cfg, progress=False)
    before, after = result["before"], result["after"]
    # Before training the policy is the reference: every implicit reward is 0, the loss log 2.
    assert before["accuracy"] == 0.0 and before["ties"] == 1.0
    assert math.isclose(before["loss"], math.log(2), abs_tol=1e-6)
    # After: every held-out pair (unseen prompt-ending combinations) is ranked the right way.
    assert after["n_pairs"] == 10 and after["accuracy"] == 1.0 and after["ties"] == 0.0
    assert after["loss"] < 0.4 and after["margin"] > 0.5
    out = tmp_path / "dpo"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "dpo/loss" in r]
    assert len(steps) == result["steps"] == 3 * math.ceil(30 / 8)
    assert {"dpo/accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward"} <= set(
        steps[0]
    )
    assert steps[-1]["dpo/loss"] < steps[0]["dpo/loss"]
    assert json.loads((out / "dpo_eval.json").read_text())["after"] == after
    assert json.loads((out / "config.json").read_text())["beta"] == cfg.beta
    # Gold and KL on fresh samples: the reference's KL to itself is exactly 0, the policy's is not.
    assert result["reference"]["kl"] == 0.0 and result["policy"]["kl"] > 0.01
    assert result["policy"]["n_samples"] == 16 and "objective/kl" in rows[-1]
    # The saved policy loads and differs from where it started.
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "policy")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(
        trained.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight
    )


def test_kl_on_fresh_samples_is_the_k1_sum_over_response_tokens(tiny_tokenizer, tiny_lm) -> None:
    from rlhf.core import response_mask_from_eos
    from rlhf.models.generation import encode_prompts, sample_responses
    from rlhf.task.gold import GoldJudge

    other = type(tiny_lm)(tiny_lm.config).eval()  # different random weights
    with torch.no_grad():  # make EOS likely, so that some samples end early and padding follows
        w_eos = tiny_lm.transformer.wte.weight[tiny_tokenizer.eos_token_id]
        tiny_lm.transformer.ln_f.bias.copy_(4 * w_eos / w_eos.pow(2).sum())
    cfg = DPOConfig(eval_response_tokens=6, seed=3)
    prompts = ["the phone was", "the plot"]
    result = sample_gold_and_kl(
        tiny_lm, other, tiny_tokenizer, prompts, GoldJudge(), cfg, torch.device("cpu")
    )
    # The same samples again (same seed), and the KL by hand, token by token.
    ids, mask, _ = encode_prompts(tiny_tokenizer, prompts)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    response = sample_responses(tiny_lm, ids, mask, 6, tiny_tokenizer.eos_token_id,
                                tiny_tokenizer.pad_token_id, generator=gen)  # fmt: skip
    keep = response_mask_from_eos(response, tiny_tokenizer.eos_token_id)
    total = 0.0
    with torch.no_grad():
        for b in range(2):
            row = [t for t, m in zip(ids[b].tolist(), mask[b].tolist()) if m] + response[b].tolist()
            P = int(mask[b].sum())
            lp = torch.log_softmax(tiny_lm(input_ids=torch.tensor([row])).logits[0], -1)
            lq = torch.log_softmax(other(input_ids=torch.tensor([row])).logits[0], -1)
            for t in range(int(keep[b].sum())):
                token = response[b, t]
                total += (lp[P - 1 + t, token] - lq[P - 1 + t, token]).item()
    assert 0 < int(keep[0].sum()) < 6 or 0 < int(keep[1].sum()) < 6  # padding to ignore
    assert math.isclose(result["kl"], total / 2, abs_tol=1e-4)
    assert result["n_samples"] == 2


def test_dpo_cli_smoke(tmp_path, tiny_model_dir, capsys) -> None:
    data = tmp_path / "prefs.jsonl"
    _write_pairs(data)
    out = tmp_path / "run"
    code = main([
        "dpo", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out),
        "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--loss-type", "ipo",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "held-out implicit-reward accuracy" in printed and "gold" not in printed
    )  # --data: no gold
    assert "0.000 (every pair tied: the policy was the reference) ->" in printed
    for name in ("dpo_eval.json", "config.json", "metrics.jsonl", "policy/config.json"):
        assert (out / name).is_file(), name
    assert list((out / "policy").glob("*.safetensors"))
    # Responses to held-out prompts from the policy and the reference, beside the data's chosen.
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"].endswith(" was") for s in samples)
    assert all({"policy", "reference", "chosen"} <= set(s) for s in samples)
    assert any(s["policy"] != s["reference"] for s in samples)
    assert json.loads((out / "config.json").read_text())["loss_type"] == "ipo"


def test_dpo_reads_renamed_fields(tmp_path, tiny_model_dir, capsys) -> None:
    data = tmp_path / "renamed.jsonl"
    _write_pairs(data)
    renamed = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
        for r in map(json.loads, data.read_text().splitlines())
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    base = ["dpo", "--data", str(data), "--model", str(tiny_model_dir), "--epochs", "1",
            "--batch-size", "16", "--eval-samples", "0"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "renamed.jsonl:1: field 'chosen': missing" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "yes"
    fields = ["--prompt-field", "question", "--chosen-field", "good", "--rejected-field", "bad"]
    assert main([*base, *fields, "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["prompt_field"], saved["chosen_field"], saved["rejected_field"]) == (
        "question", "good", "bad",
    )  # fmt: skip
    assert json.loads((out / "dpo_eval.json").read_text())["n_train_pairs"] == 36


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--beta", "0"], "--beta must be a positive number, got 0.0"),
        (["--epochs", "0"], "--epochs must be positive, got 0"),
        (["--eval-fraction", "1"], "--eval-fraction must be between 0 and 1, got 1.0"),
        (["--label-smoothing", "0.1", "--loss-type", "ipo"], "--label-smoothing applies to --loss-type sigmoid only"),
        (["--data", "MISSING"], "MISSING"),
        (["--model", "NOPE"], "model folder does not exist"),
        (["--chosen-field", "prompt"], "--prompt-field, --chosen-field and --rejected-field must be three different names"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_exit_2_and_write_nothing(
    tmp_path, option, expected, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("rlhf.models.loading.load_causal_lm", no_loading)
    monkeypatch.setattr("rlhf.task.default.base_model_dir", no_loading)
    out = tmp_path / "out"
    option = [str(tmp_path / o) if o in ("MISSING", "NOPE") else o for o in option]
    code = main(["dpo", "--out", str(out), *option])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("rlhf dpo: error: ") and expected in err, err
    assert not out.exists()


def test_bad_preference_record_names_the_line(tmp_path, tiny_model_dir, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n'
    )
    code = main(
        ["dpo", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_loss_type_is_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["dpo", "--loss-type", "hinge"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "argument --loss-type: invalid choice: 'hinge'" in err[0]


def test_conversational_pairs_are_rendered_as_train_reward_renders_them(
    tmp_path, tiny_model_dir, monkeypatch, capsys
) -> None:
    import shutil

    import rlhf.rl.dpo as dpo
    from rlhf.models.loading import load_tokenizer
    from test_data_formats import TEMPLATE

    model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, model)
    tok = load_tokenizer(model)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    data = tmp_path / "conv.jsonl"
    with open(data, "w") as f:
        for subject, ending in itertools.product(SUBJECTS, ENDINGS):
            f.write(json.dumps({
                "prompt": [{"role": "user", "content": f"{subject} was"}],
                "chosen": [{"role": "assistant", "content": f"great {ending}"}],
                "rejected": [{"role": "assistant", "content": f"dull {ending}"}],
            }) + "\n")  # fmt: skip
    seen = []
    real = dpo.encode_pairs
    monkeypatch.setattr(dpo, "encode_pairs", lambda t, p, n: seen.append(p) or real(t, p, n))
    cfg = _config(tmp_path, model, data=str(data), epochs=1)
    result = dpo.train_dpo(cfg, progress=False)
    assert result["after"]["n_pairs"] == 10
    pairs = seen[0]
    assert all(p.startswith("<|user|>\n") and p.endswith("<|assistant|>\n") for p in pairs.prompts)
    assert all(c.startswith("great ") and c.endswith("<|end|>\n") for c in pairs.chosen)
    # Without --model there is no template to render them with: one line, before any work.
    cache = tmp_path / "cache"
    args = ["dpo", "--data", str(data), "--out", str(tmp_path / "o"), "--cache-dir", str(cache)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"rlhf dpo: error: {data}: holds conversations (lists of messages), which are rendered "
        "with a chat template, and the built-in model has none; give a chat model's folder with "
        "--model"
    )
    assert not cache.exists()


def test_lora_dpo_trains_the_adapter_against_the_base_as_reference(
    tmp_path, tiny_model_dir, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import rlhf.rl.dpo as dpo

    seen = {}
    real = dpo.batched_logps

    def spy(model, *args):
        seen.setdefault("ref", model)
        return real(model, *args)

    cfg = _config(tmp_path, tiny_model_dir, lora_r=8, lr=3e-2, merge_lora=True, gold=True)
    monkeypatch.setattr(dpo, "batched_logps", spy)
    result = train_dpo(cfg, progress=False)
    # The reference is the policy with its adapters off: no second model, and its KL is 0.
    assert isinstance(seen["ref"], dpo.AdaptersOff)
    assert result["reference"]["kl"] == 0.0 and result["policy"]["kl"] > 0.01
    assert result["before"]["ties"] == 1.0 and result["after"]["accuracy"] >= 0.9
    out = tmp_path / "dpo"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = PeftModel.from_pretrained(base, out / "policy")  # the adapter, in PEFT's format
    merged = AutoModelForCausalLM.from_pretrained(out / "policy-merged")
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        # Off, the adapter leaves the base model as it was: the reference did not move.
        with lora.disable_adapter():
            off = lora(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert torch.equal(off, plain) and not torch.allclose(want, plain, atol=1e-3)


def test_adapters_off_is_the_base_model(tiny_tokenizer) -> None:
    from conftest import make_tiny_lm
    from rlhf.models.lora import AdaptersOff, LoraArgs, apply_lora

    base = make_tiny_lm(tiny_tokenizer, seed=0)
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        peft = apply_lora(base, LoraArgs(lora_r=4))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: no longer a no-op
        ref = AdaptersOff(peft)
        assert torch.equal(ref(input_ids=ids).logits, want)
        assert not torch.allclose(peft(input_ids=ids).logits, want, atol=1e-3)
    assert list(ref.parameters()) == []  # nothing counted, moved or frozen twice
