"""Real model folders, runs that survive SIGKILL and Ctrl-C, non-finite values, bad inputs.

Tiny GPT-2 and Llama models with tokenizers of their own are saved to folders and go through the
real commands (`rlhf train-reward`, `rlhf ppo`). The runs that must die part-way are subprocesses
(`python -m rlhf`); everything else calls `rlhf.cli.main` in this process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPTS, TINY_TEXTS, make_tiny_lm
from rlhf.cli import main
from rlhf.errors import ConfigError, InputError
from rlhf.models.policy import load_policy
from rlhf.models.reward_model import RewardModel
from rlhf.rl.config import PPOConfig
from rlhf.rl.trainer import PPOTrainer
from rlhf.rl.update import NonFiniteError

SRC = Path(__file__).resolve().parents[1] / "src" / "rlhf"

PAIRS = [
    ("the acting was", "superb and the story was moving .", "dull and the ending felt weak ."),
    ("this phone", "is great . the battery lasts all day .", "broke after a week ."),
    ("the plot", "was moving and i loved it .", "was dull ."),
    ("the blender", "works well .", "is loud and broke ."),
] * 4
# A simple chat template; the leading BOS checks that it is not doubled by the tokenizer's own.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Small PPO runs: 2 steps for the smoke runs, 40 for the runs that are stopped part-way.
PPO_SMALL = [
    "--batch-size", "4", "--minibatch-size", "2", "--response-tokens", "4", "--ppo-epochs", "1",
    "--device", "cpu",
]  # fmt: skip
PPO_LONG = [
    "--steps", "40", "--save-every", "2", "--keep-checkpoints", "3", "--batch-size", "4",
    "--minibatch-size", "2", "--response-tokens", "6", "--ppo-epochs", "2", "--sample-every", "3",
    "--device", "cpu",
]  # fmt: skip
REWARD_SMALL = [
    "--epochs", "1", "--batch-size", "8", "--normalise-samples", "8", "--response-tokens", "4",
    "--device", "cpu",
]  # fmt: skip


def _tokenizer_without_pad():
    """A byte-level BPE like conftest's but, like GPT-2's, with no padding token at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[eos], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(TINY_TEXTS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", special_tokens=[(eos, tok.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, padding_side="left"
    )


def _save(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    """Model folders (good and bad), a reward-model folder and input files, made once."""
    from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("robustness")
    no_pad = _tokenizer_without_pad()
    assert no_pad.pad_token is None and "<|pad|>" not in no_pad.get_vocab()
    f = {"gpt2": tiny_model_dir}
    f["llama"] = _save(root / "llama", make_tiny_lm(tiny_tokenizer, "llama"), tiny_tokenizer)
    for arch in ("gpt2", "llama"):
        f[f"{arch}-no-pad"] = _save(root / f"{arch}-no-pad", make_tiny_lm(no_pad, arch), no_pad)
    f["rm"] = root / "rm"
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        f["rm"]
    )
    chat_tok = tiny_tokenizer.__class__.from_pretrained(tiny_model_dir)
    chat_tok.chat_template = CHAT_TEMPLATE
    f["chat"] = _save(root / "chat", make_tiny_lm(tiny_tokenizer), chat_tok)
    # Bad folders.
    f["empty-dir"] = root / "empty-dir"
    f["empty-dir"].mkdir()
    bert = BertLMHeadModel(
        BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1,
                   num_attention_heads=2, intermediate_size=64)
    )  # fmt: skip
    f["bert"] = _save(root / "bert", bert, tiny_tokenizer)
    small = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer) - 50, n_embd=32, n_layer=1,
                                       n_head=2, n_positions=64))  # fmt: skip
    f["mismatch"] = _save(root / "mismatch", small, tiny_tokenizer)
    f["pickle"] = root / "pickle"
    lm = make_tiny_lm(tiny_tokenizer)
    lm.config.save_pretrained(f["pickle"])
    torch.save(lm.state_dict(), f["pickle"] / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(f["pickle"])
    f["no-tokenizer"] = root / "no-tokenizer"
    lm.save_pretrained(f["no-tokenizer"])
    f["lost-tensor"] = _save(root / "lost-tensor", lm, tiny_tokenizer)
    tensors = load_file(str(f["lost-tensor"] / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(f["lost-tensor"] / "model.safetensors"), metadata={"format": "pt"})
    # Input files.
    f["prompts"] = root / "prompts.txt"
    f["prompts"].write_text("\n".join(PROMPTS) + "\n")
    f["prefs"] = root / "prefs.jsonl"
    f["prefs"].write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    return f


def _ppo_args(f, out, *extra, model="gpt2") -> list[str]:
    return [
        "ppo", "--model", str(f[model]), "--reward-model", str(f["rm"]),
        "--prompts", str(f["prompts"]), "--out", str(out), *extra,
    ]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), ra["step"]
        for key in ra:
            if ra[key] is None or rb[key] is None:
                assert ra[key] is rb[key], (ra["step"], key)
            else:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6, rel=0), (ra["step"], key)


# ---------------------------------------------------------------------------------------------
# 1. Real model folders: train-reward then ppo, two architectures, with and without a pad token
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("pad", ["pad", "no-pad"])
def test_train_reward_then_ppo_on_a_saved_model(tmp_path, folders, arch, pad, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.rl.config import PPORunConfig
    from rlhf.rl.inputs import load_run_inputs

    model_dir = folders[arch if pad == "pad" else f"{arch}-no-pad"]
    n_saved = len(AutoTokenizer.from_pretrained(model_dir))
    rm_out, run = tmp_path / "rm", tmp_path / "run"
    args = ["--data", str(folders["prefs"]), "--model", str(model_dir), "--out", str(rm_out)]
    assert main(["train-reward", *args, *REWARD_SMALL]) == 0
    rm_dir = rm_out / "reward_model"
    ppo = ["ppo", "--model", str(model_dir), "--reward-model", str(rm_dir)]
    ppo += ["--prompts", str(folders["prompts"]), "--out", str(run), "--steps", "2", *PPO_SMALL]
    assert main(ppo) == 0
    capsys.readouterr()

    # The policy and its tokenizer load back with plain transformers; padding is not EOS.
    tok = AutoTokenizer.from_pretrained(run / "policy")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    added = pad == "no-pad"
    assert len(tok) == n_saved + added
    lm = AutoModelForCausalLM.from_pretrained(run / "policy")
    assert lm.get_input_embeddings().num_embeddings == len(tok)
    if added:
        assert lm.config.pad_token_id == tok.pad_token_id
    original = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    trained = lm.state_dict()
    same_shape = [k for k in original if k in trained and original[k].shape == trained[k].shape]
    assert any(not torch.equal(original[k], trained[k]) for k in same_shape)
    # The value head and the reward model load with rlhf's loaders.
    policy = load_policy(run / "policy")
    saved_head = load_file(str(run / "policy" / "value_head.safetensors"))
    assert torch.equal(policy.value_head.weight, saved_head["weight"])
    assert policy.value_head.weight.abs().sum() > 0
    rm = RewardModel.from_pretrained(rm_dir)
    assert rm.tokenizer.get_vocab() == tok.get_vocab()  # saved with the added pad token
    # Policy, reference and reward model as `rlhf ppo` loads them: one vocabulary.
    cfg = PPORunConfig(
        model=str(model_dir),
        reward_model=str(rm_dir),
        prompts=str(folders["prompts"]),
        device="cpu",
    )
    _, policy_lm, ref, reward_model, tokenizer = load_run_inputs(cfg, progress=False)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for model in (policy_lm, ref, reward_model.base_model):
        assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    ids = tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    assert torch.isfinite(reward_model(ids["input_ids"], ids["attention_mask"])).all()


def test_load_policy_without_a_value_head_is_a_clear_error(folders):
    with pytest.raises(InputError, match="value_head.safetensors"):
        load_policy(folders["gpt2"])


# ---------------------------------------------------------------------------------------------
# 2. Prompt files and truncation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_prompt_files_and_one_warning_for_long_prompts(
    tmp_path, folders, tiny_tokenizer, suffix, capsys
):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        path.write_text(
            "".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS))
        )
    else:
        path.write_text("\n".join(PROMPTS) + "\n")
    n_long = sum(len(tiny_tokenizer(p)["input_ids"]) > 4 for p in PROMPTS)
    assert 0 < n_long < len(PROMPTS)
    args = _ppo_args(
        folders, tmp_path / "run", "--steps", "1", "--max-prompt-tokens", "4", *PPO_SMALL
    )
    args[args.index("--prompts") + 1] = str(path)
    assert main(args) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert (
        f"{n_long} of {len(PROMPTS)} prompts" in warnings[0]
        and "--max-prompt-tokens 4" in warnings[0]
    )
    for row in map(json.loads, (tmp_path / "run" / "samples.jsonl").read_text().splitlines()):
        assert len(tiny_tokenizer(row["prompt"])["input_ids"]) <= 4


def test_prompts_too_long_for_the_positions_are_refused_with_the_fix(
    tmp_path, folders, tiny_tokenizer, capsys
):
    # The tiny GPT-2 has 128 positions. Prompts cut to --max-prompt-tokens 128 plus 4 response
    # tokens plus the scoring EOS need 133: without the check, an IndexError in the position table.
    path = tmp_path / "long.txt"
    path.write_text("".join("i watched this film and i loved every minute of it . " * 30 + f"{i}\n"
                            for i in range(4)))  # fmt: skip
    assert len(tiny_tokenizer(path.read_text().splitlines()[0])["input_ids"]) > 300
    args = _ppo_args(folders, tmp_path / "run", "--steps", "1", *PPO_SMALL)
    args[args.index("--prompts") + 1] = str(path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "IndexError" not in err, err
    assert err.startswith(f"rlhf ppo: error: {path}: the longest prompt has 128 tokens"), err
    assert "--response-tokens 4 and 1 scoring token that is 133, more than the 128 positions" in err
    fix = re.search(r"lower --max-prompt-tokens to (\d+) or less$", err)
    assert fix and int(fix.group(1)) == 123, err
    # The suggested value runs.
    assert main([*args, "--max-prompt-tokens", fix.group(1)]) == 0


def test_truncated_prompts_keep_their_last_tokens(tiny_tokenizer):
    from rlhf.models.generation import truncate_prompts

    cut, n = truncate_prompts(tiny_tokenizer, PROMPTS, 4)
    assert n == sum(len(tiny_tokenizer(p)["input_ids"]) > 4 for p in PROMPTS)
    for before, after in zip(PROMPTS, cut):
        assert before.endswith(after)
        assert len(tiny_tokenizer(after)["input_ids"]) <= 4
        if len(tiny_tokenizer(before)["input_ids"]) <= 4:
            assert after == before


# ---------------------------------------------------------------------------------------------
# 3-4. Nothing lost: SIGKILL and Ctrl-C part-way, then --resume, match an uninterrupted run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, folders):
    """The uninterrupted run that the stopped and resumed runs must reproduce step for step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_ppo_args(folders, out, *PPO_LONG)) == 0
    return out


def _start(folders, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread, as here
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "rlhf", *_ppo_args(folders, out, *PPO_LONG)],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env,
        )  # fmt: skip


def _wait_for_rows(proc: subprocess.Popen, out: Path, n: int, log: Path) -> None:
    """Wait until the run has logged `n` steps (and so written its checkpoint at step 4)."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) too early:\n{log.read_text()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no step {n} after 120 s:\n{log.read_text()}")


def _assert_same_run(run: Path, reference: Path) -> None:
    _assert_same_rows(_rows(run), _rows(reference))
    assert (run / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
    a = load_file(str(run / "policy" / "model.safetensors"))
    b = load_file(str(reference / "policy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    for folder in (run, reference):
        # --keep-checkpoints 3, every 2 steps of 40; no half-written checkpoint folder is left.
        kept = [p.name for p in sorted((folder / "checkpoints").iterdir())]
        assert kept == ["step-000036", "step-000038", "step-000040"]
        assert not list(folder.rglob(".tmp-*"))


def test_sigkilled_run_resumes_to_the_same_metrics(tmp_path, folders, reference_run, capsys):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _start(folders, out, log)
    _wait_for_rows(proc, out, 5, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (out / "checkpoints" / "step-000004" / "state.pt").is_file()
    assert main(_ppo_args(folders, out, *PPO_LONG, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    _assert_same_run(out, reference_run)


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(
    tmp_path, folders, reference_run, capsys
):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _start(folders, out, log)
    _wait_for_rows(proc, out, 3, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = log.read_text()
    assert "Traceback" not in err
    done = len(_rows(out))  # the step running at Ctrl-C finished and was logged
    last = err.strip().splitlines()[-1]
    command = "python -m rlhf " + shlex.join([*_ppo_args(folders, out, *PPO_LONG), "--resume"])
    assert last == (
        f"rlhf ppo: interrupted after {done} of 40 steps; saved checkpoint "
        f"{out / 'checkpoints' / f'step-{done:06d}'}. Continue with: {command}"
    )
    assert [line for line in err.splitlines() if "--resume" in line] == [last]
    assert (out / "checkpoints" / f"step-{done:06d}" / "state.pt").is_file()
    # The printed command, run as printed, finishes the run; its summary counts only its steps.
    assert main(shlex.split(last.split("Continue with: ")[1])[3:]) == 0
    _assert_same_run(out, reference_run)
    printed = capsys.readouterr().out
    assert f"PPO: {40 - done} steps in " in printed and f"(resumed from step {done};" in printed


def test_resume_extends_a_finished_run(tmp_path, folders, reference_run, capsys):
    # A 36-step run checkpoints its last step; `--steps 40 --resume` goes on from there and ends
    # where the uninterrupted 40-step run does.
    out = tmp_path / "run"
    short = list(PPO_LONG)
    short[short.index("--steps") + 1] = "36"
    assert main(_ppo_args(folders, out, *short)) == 0
    assert (out / "checkpoints" / "step-000036" / "state.pt").is_file()
    assert main(_ppo_args(folders, out, *PPO_LONG, "--resume")) == 0
    assert "(step 36)" in capsys.readouterr().out
    _assert_same_rows(_rows(out), _rows(reference_run))
    a = load_file(str(out / "policy" / "model.safetensors"))
    b = load_file(str(reference_run / "policy" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--steps", "30"], "is already at step 40; --steps 30 leaves nothing to run"),
        (
            ["--model", "DIR:llama", "--steps", "50"],
            "step-000040: --model ",  # and the two folders; --steps may grow (constant LR)
        ),
        (
            # The saved optimizer state would silently replace a new --lr; it is refused instead.
            ["--lr", "1e-3", "--steps", "50", "--batch-size", "8"],
            "options differ from the run that wrote "
            "STEP40: --batch-size 4 -> 8, --lr 3e-05 -> 0.001; resume with that run's values",
        ),
    ],
)
def test_resume_that_cannot_continue_is_one_line(
    tmp_path, folders, reference_run, change, expected, capsys
):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    before = _tree(out)
    args = _ppo_args(folders, out, *PPO_LONG, "--resume")
    for option, value in zip(change[::2], change[1::2]):
        value = str(folders[value[4:]]) if value.startswith("DIR:") else value
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    expected = expected.replace("STEP40", str(out / "checkpoints" / "step-000040"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlhf ppo: error: ") and expected in err, (
        err
    )
    assert _tree(out) == before


def test_resume_with_linear_decay_refuses_a_new_step_count(tmp_path, folders, capsys):
    # The linear schedule decays to zero over --steps; a new --steps would restart the decay from
    # a new horizon part-way, so it is refused. The same --steps resumes.
    out = tmp_path / "run"
    base = [*PPO_SMALL, "--lr-schedule", "linear", "--save-every", "2"]
    assert main(_ppo_args(folders, out, "--steps", "2", *base)) == 0
    capsys.readouterr()
    assert main(_ppo_args(folders, out, "--steps", "4", *base, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--steps 2 -> 4 (--lr-schedule linear fixed the decay to zero at 2 steps)" in err, err
    # With the constant schedule the same extension is allowed.
    const = tmp_path / "const"
    assert main(_ppo_args(folders, const, "--steps", "2", *PPO_SMALL, "--save-every", "2")) == 0
    assert main(_ppo_args(folders, const, "--steps", "4", *PPO_SMALL, "--save-every", "2",
                          "--resume")) == 0  # fmt: skip
    assert "(step 2)" in capsys.readouterr().out


# SIGTERM is what schedulers send before they kill a job, and some torch versions' torchrun its
# workers: it stops after the step as Ctrl-C does.
@pytest.mark.parametrize(
    "sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")], ids=["ctrl-c", "sigterm"]
)
def test_a_second_signal_stops_at_once_and_the_handler_is_restored(capfd, sig, name):
    from rlhf.rl.run import _GracefulStop

    before = signal.getsignal(sig)
    with _GracefulStop() as stop:
        signal.raise_signal(sig)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(sig)
    assert signal.getsignal(sig) is before
    assert (
        f"{name}: stopping after this step to write a checkpoint ({name} again stops at once)"
        in capfd.readouterr().err
    )


def test_only_rank_0_says_it_stops(capfd):
    from rlhf.rl.run import _GracefulStop

    with _GracefulStop(speak=False) as stop:  # ranks other than 0 under torchrun
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
    assert capfd.readouterr().err == ""


def test_interrupt_inside_a_step_points_to_the_last_checkpoint(
    tmp_path, folders, monkeypatch, capsys
):
    original, calls = PPOTrainer.step, []

    def step(self, prompts, columns=None):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a second Ctrl-C would, half-way through step 4
        return original(self, prompts, columns)

    monkeypatch.setattr(PPOTrainer, "step", step)
    out = tmp_path / "run"
    assert main(_ppo_args(folders, out, "--steps", "6", "--save-every", "2", *PPO_SMALL)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    command = shlex.join(
        [*_ppo_args(folders, out, "--steps", "6", "--save-every", "2", *PPO_SMALL), "--resume"]
    )
    assert err.strip().splitlines()[-1] == (
        f"rlhf ppo: interrupted during step 4 of 6; the newest checkpoint is "
        f"{out / 'checkpoints' / 'step-000002'}. Continue with: rlhf {command}"
    )
    assert len(_rows(out)) == 3


# ---------------------------------------------------------------------------------------------
# 5. Non-finite reward, loss or gradient
# ---------------------------------------------------------------------------------------------


def test_nan_reward_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, folders, monkeypatch, capsys
):
    original, calls = RewardModel.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        scores = original(self, *args, **kwargs)
        return scores if len(calls) < 3 else torch.full_like(scores, float("nan"))

    monkeypatch.setattr(RewardModel, "forward", forward)
    out = tmp_path / "run"
    assert main(_ppo_args(folders, out, "--steps", "6", "--save-every", "2", *PPO_SMALL)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # the last line is the error, after the progress bar
    assert err.strip().splitlines()[-1] == (
        "rlhf ppo: error: step 3: the reward model returned a non-finite score; the last good "
        f"checkpoint is {out / 'checkpoints' / 'step-000002'}"
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert len(_rows(out)) == 2 and not (out / "policy").exists()


def test_reward_model_with_a_nan_head_is_stopped_at_the_first_step(
    tmp_path, folders, tiny_tokenizer, capsys
):
    rm = RewardModel.from_pretrained(folders["rm"])
    with torch.no_grad():
        rm.reward_head.bias.fill_(float("nan"))
    rm.save_pretrained(tmp_path / "nan-rm")
    args = _ppo_args(folders, tmp_path / "run", "--steps", "2", *PPO_SMALL)
    args[args.index("--reward-model") + 1] = str(tmp_path / "nan-rm")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "rlhf ppo: error: step 1: the reward model returned a non-finite score"
    )


def _trainer(tok) -> PPOTrainer:
    import copy

    policy = make_tiny_lm(tok)
    reward_model = RewardModel(make_tiny_lm(tok, seed=2), tokenizer=tok)
    config = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=2, response_tokens=6, lr=1e-3)
    return PPOTrainer(policy, copy.deepcopy(policy), reward_model, tok, config)


def _snapshot(trainer: PPOTrainer) -> tuple[dict, list]:
    weights = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    adam = [{k: v.clone() for k, v in s.items()} for s in trainer.optimizer.state.values()]
    return weights, adam


def _assert_unchanged(trainer: PPOTrainer, snapshot: tuple[dict, list]) -> None:
    weights, adam = snapshot
    assert all(torch.equal(v, weights[k]) for k, v in trainer.policy.state_dict().items())
    now = list(trainer.optimizer.state.values())
    assert len(now) == len(adam)
    assert all(torch.equal(s[k], t[k]) for s, t in zip(now, adam) for k in s)


def test_nan_loss_changes_no_weight_and_names_the_step(tiny_tokenizer, monkeypatch):
    import rlhf.rl.update

    trainer = _trainer(tiny_tokenizer)
    trainer.step(PROMPTS)
    before = _snapshot(trainer)
    original = rlhf.rl.update.policy_loss_per_token

    def nan_loss(*args, **kwargs):
        loss, clipped, log_ratio = original(*args, **kwargs)
        return loss * float("nan"), clipped, log_ratio

    monkeypatch.setattr(rlhf.rl.update, "policy_loss_per_token", nan_loss)
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss is not finite"):
        trainer.step(PROMPTS)
    _assert_unchanged(trainer, before)


def test_nan_gradient_changes_no_weight_and_names_the_step(tiny_tokenizer):
    trainer = _trainer(tiny_tokenizer)
    trainer.step(PROMPTS)
    before = _snapshot(trainer)
    trainer.policy.value_head.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(NonFiniteError, match=r"^step 2: the gradient norm is not finite"):
        trainer.step(PROMPTS)
    _assert_unchanged(trainer, before)


# ---------------------------------------------------------------------------------------------
# 6. Bad input: one line, exit code 2, nothing loaded before the check, outputs untouched
# ---------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# Each case: (command, what to change, expected text in the message, whether models may load).
# A change is `{option: value}`; a value "FILE:<name>:<content>" is written to a file first, and
# "DIR:<name>" is a folder from the `folders` fixture.
BAD_INPUTS = {
    # rlhf ppo: prompt files
    "ppo-prompts-missing": ("ppo", {"--prompts": "MISSING:nope.txt"}, "nope.txt: does not exist", False),
    "ppo-prompts-empty": ("ppo", {"--prompts": "FILE:p.txt:"}, "p.txt: is empty", False),
    "ppo-prompts-not-utf8": ("ppo", {"--prompts": "FILE:p.txt:ok\n\xff\xfe bad\n"}, "p.txt:2: not valid UTF-8", False),
    "ppo-prompts-not-json": ("ppo", {"--prompts": 'FILE:p.jsonl:{"prompt": "a"}\n{"prompt": \n'}, "p.jsonl:2: not valid JSON", False),
    "ppo-prompts-no-field": ("ppo", {"--prompts": 'FILE:p.jsonl:{"text": "a"}\n'}, "p.jsonl:1: field 'prompt': missing", False),
    "ppo-prompts-wrong-type": ("ppo", {"--prompts": 'FILE:p.jsonl:{"prompt": 3}\n'}, "p.jsonl:1: field 'prompt': expected a string", False),
    # rlhf ppo: model folders
    "ppo-model-missing": ("ppo", {"--model": "MISSING:no-model"}, "no-model: model folder does not exist", False),
    "ppo-model-not-a-model": ("ppo", {"--model": "DIR:empty-dir"}, "empty-dir: no config.json", False),
    "ppo-model-not-causal": ("ppo", {"--model": "DIR:bert"}, "bert: not a causal language model", True),
    "ppo-model-tokenizer-mismatch": ("ppo", {"--model": "DIR:mismatch"}, "tokenizer has 300 tokens but the model has only 250", True),
    "ppo-model-pickle-only": ("ppo", {"--model": "DIR:pickle"}, "pickle: weights are only in pytorch_model.bin", True),
    "ppo-model-lost-tensor": ("ppo", {"--model": "DIR:lost-tensor"}, "lost-tensor: the safetensors files lack 1 of the model's tensors (first: transformer.h.1.mlp.c_fc.weight)", True),
    "ppo-model-no-tokenizer": ("ppo", {"--model": "DIR:no-tokenizer"}, "no-tokenizer: no tokenizer files", True),
    "ppo-ref-model-missing": ("ppo", {"--ref-model": "MISSING:no-ref"}, "no-ref: model folder does not exist", False),
    "ppo-reward-model-is-an-lm": ("ppo", {"--reward-model": "DIR:gpt2"}, "not a reward model folder", False),
    "ppo-chat-template-missing": ("ppo", {"--chat-template": None}, "--chat-template: the tokenizer in", False),
    # rlhf ppo: options
    "ppo-kl-coef": ("ppo", {"--kl-coef": "-1"}, "--kl-coef must be >= 0, got -1.0", False),
    "ppo-minibatch": ("ppo", {"--minibatch-size": "3"}, "--minibatch-size 3 must divide --batch-size 4", False),
    "ppo-steps": ("ppo", {"--steps": "0"}, "--steps must be positive, got 0", False),
    "ppo-response-tokens": ("ppo", {"--response-tokens": "-2"}, "--response-tokens must be positive", False),
    "ppo-kl-in-loss-k1": ("ppo", {"--kl-in": "loss", "--kl-estimator": "k1"}, "--kl-in loss with --kl-estimator k1 gives no KL constraint", False),
    "ppo-top-k": ("ppo", {"--top-k": "50"}, "--top-k 50: PPO samples from the full softmax", False),
    "ppo-prompts-too-long": ("ppo", {"--prompts": "FILE:p.txt:" + "the acting was superb . " * 40 + "\n"}, "more than the 128 positions of --model", False),
    "ppo-keep-checkpoints": ("ppo", {"--keep-checkpoints": "0"}, "--keep-checkpoints must be positive, got 0", False),
    "ppo-resume-nothing": ("ppo", {"--resume": None}, "--resume: no checkpoint in", False),
    "ppo-device": ("ppo", {"--device": "nonsense"}, "--device: unknown device 'nonsense'", False),
    "ppo-model-without-reward-model": ("ppo", {"--reward-model": "DROP"}, "--model needs a reward: --reward-model", False),
    # rlhf train-reward: preference files
    "rm-data-missing": ("train-reward", {"--data": "MISSING:nope.jsonl"}, "nope.jsonl: does not exist", False),
    "rm-data-empty": ("train-reward", {"--data": "FILE:d.jsonl:"}, "d.jsonl: is empty", False),
    "rm-data-not-utf8": ("train-reward", {"--data": "FILE:d.jsonl:\xff\n"}, "d.jsonl:1: not valid UTF-8", False),
    "rm-data-not-json": ("train-reward", {"--data": "FILE:d.jsonl:[1, 2\n"}, "d.jsonl:1: not valid JSON", False),
    "rm-data-no-field": ("train-reward", {"--data": 'FILE:d.jsonl:{"prompt": "p", "chosen": "a"}\n'}, "d.jsonl:1: field 'rejected': missing", False),
    "rm-data-wrong-type": ("train-reward", {"--data": 'FILE:d.jsonl:{"prompt": "p", "chosen": 1, "rejected": "b"}\n'}, "d.jsonl:1: field 'chosen': expected a string", False),
    "rm-data-label": ("train-reward", {"--data": 'FILE:d.jsonl:{"prompt": "p", "response_A": "a", "response_B": "b", "preference": "C"}\n'}, "d.jsonl:1: field 'preference': must be 'A' or 'B'", False),
    "rm-data-empty-response": ("train-reward", {"--data": 'FILE:d.jsonl:{"prompt": "p", "chosen": "", "rejected": "b"}\n'}, "d.jsonl:1: field 'chosen'", False),
    "rm-data-one-pair": ("train-reward", {"--data": 'FILE:d.jsonl:{"prompt": "p", "chosen": "a", "rejected": "b"}\n'}, "d.jsonl: only 1 pair(s), and the held-out split", False),
    # rlhf train-reward: model folders and options
    "rm-model-missing": ("train-reward", {"--model": "MISSING:no-model"}, "no-model: model folder does not exist", False),
    "rm-model-not-a-model": ("train-reward", {"--model": "DIR:empty-dir"}, "empty-dir: no config.json", False),
    "rm-model-not-causal": ("train-reward", {"--model": "DIR:bert"}, "bert: not a causal language model", True),
    "rm-model-tokenizer-mismatch": ("train-reward", {"--model": "DIR:mismatch"}, "tokenizer has 300 tokens but the model has only 250", True),
    "rm-chat-template-missing": ("train-reward", {"--chat-template": None}, "--chat-template: the tokenizer in", False),
    "rm-max-length": ("train-reward", {"--max-length": "300"}, "--max-length 300 exceeds the 128 positions of the model in", False),
    "rm-batch-size": ("train-reward", {"--batch-size": "0"}, "--batch-size must be positive, got 0", False),
    "rm-epochs": ("train-reward", {"--epochs": "-1"}, "--epochs must be positive, got -1", False),
    "rm-lr": ("train-reward", {"--lr": "0"}, "--lr must be positive", False),
}  # fmt: skip


def _command(f, tmp_path: Path, cmd: str, change: dict, out: Path) -> list[str]:
    if cmd == "ppo":
        base = {"--model": str(f["gpt2"]), "--reward-model": str(f["rm"]), "--prompts": str(f["prompts"]),
                "--steps": "2", "--batch-size": "4", "--minibatch-size": "2", "--device": "cpu"}  # fmt: skip
    else:
        base = {
            "--data": str(f["prefs"]),
            "--model": str(f["gpt2"]),
            "--epochs": "1",
            "--device": "cpu",
        }
    for option, value in change.items():
        if value == "DROP":
            base.pop(option)
        elif value is None:
            base[option] = None
        elif value.startswith("MISSING:"):
            base[option] = str(tmp_path / value.split(":", 1)[1])
        elif value.startswith("DIR:"):
            base[option] = str(f[value.split(":", 1)[1]])
        elif value.startswith("FILE:"):
            _, name, content = value.split(":", 2)
            base[option] = str(_write(tmp_path / name, content.encode("latin-1")))
        else:
            base[option] = value
    args = [cmd, "--out", str(out)]
    for option, value in base.items():
        args += [option] if value is None else [option, value]
    return args


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    tmp_path, folders, case, monkeypatch, capsys
):
    cmd, change, expected, loads_models = BAD_INPUTS[case]
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "metrics.jsonl", '{"step": 0, "objective/reward": 1.0}\n')
    _write(out / "config.json", "{}\n")
    before = _tree(out)
    if not loads_models:  # the check must come before any model is loaded

        def no_loading(*args, **kwargs):
            raise AssertionError(f"{case}: a model was loaded before the input was checked")

        monkeypatch.setattr("rlhf.models.loading.load_causal_lm", no_loading)
    code = main(_command(folders, tmp_path, cmd, change, out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"rlhf {cmd}: error: ") and expected in err, err
    assert _tree(out) == before


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["ppo", "--nope"], "rlhf ppo: error: unrecognized arguments: --nope (see rlhf ppo --help)"),
        (["demo", "--steps", "3"], "rlhf demo: error: unrecognized arguments: --steps 3 (see rlhf demo --help)"),
        (["frobnicate"], "rlhf: error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_naming_the_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err


def test_unknown_kl_estimator_is_refused_by_the_parser(tmp_path, folders, capsys):
    with pytest.raises(SystemExit) as info:
        main(_ppo_args(folders, tmp_path / "run", "--kl-estimator", "k9"))
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "argument --kl-estimator: invalid choice: 'k9'" in err[0]
    assert err[0].startswith("rlhf ppo: error:") and err[0].endswith("(see rlhf ppo --help)")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 7. Safe by default: safetensors only, torch.load with weights_only, no remote code by default
# ---------------------------------------------------------------------------------------------


def _calls(name: str):
    """(file, call node) for every call of an attribute `name` in the package's source."""
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == name
            ):
                yield path.relative_to(SRC), node


def _keyword(node: ast.Call, name: str):
    found = [k.value for k in node.keywords if k.arg == name]
    return found[0] if found else None


def test_source_loads_nothing_unsafe():
    loads = list(_calls("load"))
    torch_loads = [
        (p, n)
        for p, n in loads
        if isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"
    ]
    assert torch_loads, "expected the checkpoint loader"
    for path, node in torch_loads:
        flag = _keyword(node, "weights_only")
        assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{node.lineno}"
    hub = [(p, n) for p, n in _calls("from_pretrained")
           if isinstance(n.func.value, ast.Name) and n.func.value.id.startswith("Auto")]  # fmt: skip
    assert len(hub) >= 3
    for path, node in hub:
        where = f"{path}:{node.lineno}"
        local = _keyword(node, "local_files_only")
        assert isinstance(local, ast.Constant) and local.value is True, where
        remote = _keyword(node, "trust_remote_code")
        assert isinstance(remote, ast.Name) and remote.id == "trust_remote_code", where
        if node.func.value.id.startswith("AutoModel"):
            safe = _keyword(node, "use_safetensors")
            assert isinstance(safe, ast.Constant) and safe.value is True, where
    text = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    assert not re.search(r"trust_remote_code\s*=\s*True", text)


def test_pickled_weights_are_refused_without_unpickling(folders, monkeypatch):
    from rlhf.models.loading import load_causal_lm

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(InputError, match="pickle"):
        load_causal_lm(folders["pickle"])


@pytest.mark.parametrize("model_type", ["gpt2", "evil"])
def test_remote_code_is_not_run_without_the_flag(tmp_path, folders, model_type):
    """A folder that asks for its own code gets the library's class, or an error; never its code."""
    from rlhf.models.loading import load_causal_lm

    folder = tmp_path / "remote"
    shutil.copytree(folders["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    _write(folder / "config.json", json.dumps(config))
    marker = tmp_path / "ran"
    _write(folder / "evil.py", f"open({str(marker)!r}, 'w').close()\n")
    if model_type == "gpt2":
        assert type(load_causal_lm(folder)).__name__ == "GPT2LMHeadModel"
    else:
        with pytest.raises(InputError, match="config.json"):
            load_causal_lm(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 8. Chat templates
# ---------------------------------------------------------------------------------------------


def test_chat_template_wraps_prompts_without_doubling_bos(folders):
    from rlhf.models.generation import apply_chat_template
    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer(folders["chat"])
    (text,) = apply_chat_template(tok, ["the plot"])
    assert text == "<|user|>the plot\n<|assistant|>"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    with pytest.raises(ConfigError, match="--chat-template"):
        apply_chat_template(load_tokenizer(folders["gpt2"]), ["the plot"])


def test_chat_template_option_in_train_reward_and_ppo(tmp_path, folders, capsys):
    rm_out = tmp_path / "rm"
    args = ["--data", str(folders["prefs"]), "--model", str(folders["chat"]), "--out", str(rm_out)]
    assert main(["train-reward", *args, "--chat-template", *REWARD_SMALL]) == 0
    assert json.loads((rm_out / "config.json").read_text())["chat_template"] is True
    run = tmp_path / "run"
    args = _ppo_args(folders, run, "--steps", "1", "--chat-template", *PPO_SMALL, model="chat")
    args[args.index("--reward-model") + 1] = str(rm_out / "reward_model")
    assert main(args) == 0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(
        s["prompt"].startswith("<|user|>") and s["prompt"].endswith("\n<|assistant|>")
        for s in samples
    )
    capsys.readouterr()
