"""What a newcomer meets in the first hour (issue 14): nothing overwritten silently, an API that
refuses the wrong arguments with a message that says what to pass, and messages that point the way.

`rlhf ppo` run again in a folder replaces the whole earlier run (TensorBoard files included) and
says so; `ppo_step` takes a string as one prompt and names the class it expected; `--reward-model`
takes the folder `rlhf train-reward --out` wrote; `rlhf plot` on a folder of runs plots each;
`--help` is grouped; the PPO bar reaches 100 %; transformers' own bars stay out of library calls.
The demo's side of it (its folders, report, colours, bar labels) is in test_demo.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_lm
from rlhf.cli import main
from rlhf.models.reward_model import RewardModel

PROMPTS = ["the plot", "this phone is great . the battery", "i watched this film and", "the"]
SMALL = [
    "--batch-size", "4", "--minibatch-size", "2", "--response-tokens", "4", "--ppo-epochs", "1",
    "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    """A reward model saved the way `rlhf train-reward --out RUN` saves it (RUN/reward_model/,
    beside the run's own config.json), and a prompt file."""
    root = tmp_path_factory.mktemp("first-hour")
    rm_run = root / "rm-run"
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        rm_run / "reward_model"
    )
    (rm_run / "config.json").write_text(json.dumps({"out": str(rm_run), "epochs": 2}))
    (rm_run / "reward_eval.json").write_text(json.dumps({"accuracy": 0.5}))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"model": tiny_model_dir, "rm_run": rm_run, "prompts": prompts}


def _ppo(inputs, out: Path, *extra: str) -> list[str]:
    return [
        "ppo", "--model", str(inputs["model"]), "--reward-model", str(inputs["rm_run"] / "reward_model"),
        "--prompts", str(inputs["prompts"]), "--out", str(out), *SMALL, *extra,
    ]  # fmt: skip


def _events(out: Path) -> list[Path]:
    return sorted((out / "tensorboard").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# Losing results: a new run in the same folder replaces the old one entirely, and says so
# ---------------------------------------------------------------------------------------------


def test_ppo_run_again_replaces_the_earlier_run_and_says_so(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    assert main(_ppo(inputs, out, "--steps", "3", "--save-every", "1")) == 0
    assert "held an earlier run" not in capsys.readouterr().out
    assert len(_events(out)) == 1
    (out / "reward_kl_tradeoff.png").write_bytes(b"a figure of the first run")
    (out / "notes.txt").write_text("mine")  # not the run's: left alone

    assert main(_ppo(inputs, out, "--steps", "2", "--save-every", "0")) == 0
    printed = capsys.readouterr().out.splitlines()
    replaced = [line for line in printed if "held an earlier run" in line]
    assert len(replaced) == 1, printed
    for name in ("metrics.jsonl", "samples.jsonl", "tensorboard/", "checkpoints/", "policy/"):
        assert name in replaced[0], name
    assert "--resume" in replaced[0]
    # One TensorBoard file (three runs used to leave three), none of the first run's checkpoints
    # (the second writes none with --save-every 0) and no figure of the first run.
    assert len(_events(out)) == 1
    assert not (out / "checkpoints").exists()
    assert (out / "reward_kl_tradeoff.png").read_bytes() != b"a figure of the first run"  # redrawn
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_a_folder_that_never_held_a_run_keeps_its_files(tmp_path, inputs, capsys):
    out = tmp_path / "project"
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "notes.md").write_text("the user's own")
    assert main(_ppo(inputs, out, "--steps", "1")) == 0
    assert "held an earlier run" not in capsys.readouterr().out
    assert (out / "policy" / "notes.md").read_text() == "the user's own"


def test_a_bad_option_replaces_nothing(tmp_path, inputs, capsys):
    out = tmp_path / "run"
    assert main(_ppo(inputs, out, "--steps", "2")) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    args = _ppo(inputs, out, "--steps", "2")
    args[args.index("--prompts") + 1] = str(tmp_path / "missing.txt")
    assert main(args) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert "held an earlier run" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Progress: the PPO bar ends at N of N, under the label it was given
# ---------------------------------------------------------------------------------------------


def test_ppo_progress_bar_reaches_the_last_step(tmp_path, inputs, monkeypatch):
    from rlhf.rl import run
    from rlhf.rl.config import PPORunConfig

    bars = []

    def recording_bar(*args, **kwargs):
        bars.append(run_progress_bar(*args, **kwargs))
        return bars[-1]

    run_progress_bar = run.progress_bar
    monkeypatch.setattr(run, "progress_bar", recording_bar)
    cfg = PPORunConfig(
        model=str(inputs["model"]), reward_model=str(inputs["rm_run"] / "reward_model"),
        prompts=str(inputs["prompts"]), out=str(tmp_path / "run"), steps=3, batch_size=4,
        minibatch_size=2, response_tokens=4, ppo_epochs=1, device="cpu",
    )  # fmt: skip
    run.train_ppo(cfg, progress=True, label="vanilla policy gradient (kl_coef 0.1)")
    (bar,) = bars
    assert (bar.n, bar.total) == (3, 3)
    assert bar.desc.startswith("vanilla policy gradient (kl_coef 0.1)")


# ---------------------------------------------------------------------------------------------
# Pointing the way: a train-reward run folder is a reward model; plot a folder of runs
# ---------------------------------------------------------------------------------------------


def test_reward_model_option_takes_the_train_reward_run_folder(tmp_path, inputs):
    out = tmp_path / "run"
    args = _ppo(inputs, out, "--steps", "1")
    args[args.index("--reward-model") + 1] = str(inputs["rm_run"])  # not .../reward_model
    assert main(args) == 0
    assert (out / "policy" / "config.json").is_file()


def test_reward_model_option_still_refuses_a_folder_without_a_reward_model(
    tmp_path, inputs, capsys
):
    args = _ppo(inputs, tmp_path / "run", "--steps", "1")
    args[args.index("--reward-model") + 1] = str(inputs["model"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a reward model folder" in err


def _write_run(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_a_folder_of_runs_plots_each_and_names_them(tmp_path, capsys):
    ppo_rows = [
        {"step": s, "objective/reward": 0.1 * s, "objective/kl": 0.2 * s, "objective/kl_coef": 0.1}
        for s in range(6)
    ]
    _write_run(tmp_path / "demo" / "with_kl", ppo_rows)
    _write_run(tmp_path / "demo" / "no_kl", ppo_rows)
    _write_run(tmp_path / "demo" / "rm", [{"step": 1, "reward/loss": 0.6}])  # a reward-model run
    assert main(["plot", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "has no metrics.jsonl; plotting the 3 runs inside it: no_kl, rm, with_kl" in out
    for run in ("with_kl", "no_kl"):
        assert (tmp_path / "demo" / run / "reward_kl_tradeoff.png").is_file()
        assert f"wrote {tmp_path / 'demo' / run / 'reward_kl_tradeoff.png'}" in out
    # A reward-model run gets its training curves, not PPO's figures.
    assert f"wrote {tmp_path / 'demo' / 'rm' / 'training_curves.png'}" in out
    assert not (tmp_path / "demo" / "rm" / "reward_kl_tradeoff.png").exists()


def test_plot_a_folder_without_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no metrics.jsonl" in err, err


# ---------------------------------------------------------------------------------------------
# `--help`: grouped options, examples, the ppo-details pointer; new fields find a group
# ---------------------------------------------------------------------------------------------


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return capsys.readouterr().out


def test_ppo_help_is_grouped_inputs_first_with_examples(capsys):
    text = _help(capsys, "ppo")
    headings = ["inputs:", "outputs:", "PPO:", "KL penalty:", "generation:", "run:", "examples:"]
    positions = [text.index(f"\n{h}") for h in headings]
    assert positions == sorted(positions), text
    inputs_part = text[positions[0] : positions[1]]
    for option in ("--model", "--reward-model", "--prompts"):
        assert option in inputs_part, option
    assert "--kl-estimator" in text[positions[3] : positions[4]]
    assert "--steps" in text[positions[2] : positions[3]]
    assert "docs/ppo-details.md" in text and "(ppo-details 19)" in text
    assert "--resume" in text[positions[-1] :]


def test_train_reward_help_is_grouped(capsys):
    text = _help(capsys, "train-reward")
    headings = ["inputs:", "outputs:", "preference data:", "training:", "run:", "examples:"]
    positions = [text.index(f"\n{h}") for h in headings]
    assert positions == sorted(positions), text
    assert "--data" in text[positions[0] : positions[1]]
    assert "--n-pairs" in text[positions[2] : positions[3]]


def test_new_config_fields_land_in_a_group_without_editing_the_cli():
    import argparse

    from rlhf.cli_options import PPO_HELP_GROUPS, add_config_arguments
    from rlhf.rl.config import PPOConfig, PPORunConfig

    @dataclasses.dataclass
    class NewPPOOptions(PPOConfig):
        clip_schedule: str = "constant"
        """a new PPO option"""
        lora_rank: int = 0
        """a LoRA option"""

    @dataclasses.dataclass
    class NewRunOptions(PPORunConfig, NewPPOOptions):
        world_size: int = 1
        """a distributed option"""
        kl_warmup: int = 0
        """a KL option"""

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, NewRunOptions, groups=PPO_HELP_GROUPS)
    group_of = {
        action.dest: group.title
        for group in parser._action_groups
        for action in group._group_actions
    }
    assert group_of["kl_warmup"] == "KL penalty"  # by its name
    assert group_of["lora_rank"] == "LoRA"  # by its name
    assert group_of["clip_schedule"] == "PPO"  # declared in a PPOConfig
    assert group_of["world_size"] == "run"  # declared in a PPORunConfig
    assert group_of["vf_coef"] == "PPO"  # a PPOConfig field named nowhere
    assert all(group_of[f.name] in PPO_HELP_GROUPS for f in dataclasses.fields(PPOConfig))


# ---------------------------------------------------------------------------------------------
# ppo_step: a string is one prompt; wrong kinds of argument are refused by name
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def models(tiny_tokenizer):
    policy = make_tiny_lm(tiny_tokenizer)
    reward_model = RewardModel(make_tiny_lm(tiny_tokenizer, seed=2), tokenizer=tiny_tokenizer)
    return policy, reward_model


def test_ppo_step_takes_a_string_as_one_prompt(models):
    from rlhf import ppo_step

    policy, reward_model = models
    ppo_step(policy, reward_model, copy.deepcopy(policy), "the acting was")
    rollout = policy.__dict__["_rlhf_ppo_trainer"].last_rollout
    assert rollout.prompts == ["the acting was"]
    assert rollout.query_response.shape[0] == 1


def test_ppo_step_without_a_reference_freezes_a_copy_of_the_first_policy(models):
    from rlhf import ppo_step

    policy, reward_model = models
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ppo_step(policy, reward_model, None, PROMPTS)
    ppo_step(policy, reward_model, None, PROMPTS)
    ref = policy.__dict__["_rlhf_ppo_trainer"].ref_model
    assert ref is not policy
    ref_state = ref.state_dict()
    assert all(torch.equal(ref_state[k], before[k]) for k in before)  # the policy at the first call
    assert any(not torch.equal(policy.state_dict()[k], before[k]) for k in before)  # trained
    assert not any(p.requires_grad for p in ref.parameters())


@pytest.mark.parametrize(
    "argument, make, expected",
    [
        ("reward_model", lambda tok, d: make_tiny_lm(tok), "RewardModel.from_pretrained(folder)"),
        ("reward_model", lambda tok, d: str(d), "is a path"),
        ("policy_model", lambda tok, d: str(d), "AutoModelForCausalLM.from_pretrained(folder)"),
        ("ref_model", lambda tok, d: Path(d), "AutoModelForCausalLM.from_pretrained(folder)"),
        ("ref_model", lambda tok, d: RewardModel(make_tiny_lm(tok), tokenizer=tok), "is a RewardModel"),
        ("prompts", lambda tok, d: 3, "list of strings"),
        ("prompts", lambda tok, d: ["ok", 3], "prompts must be strings"),
        ("prompts", lambda tok, d: [], "prompts is empty"),
    ],
)  # fmt: skip
def test_ppo_step_names_what_it_expected(
    models, tiny_tokenizer, tiny_model_dir, argument, make, expected
):
    from rlhf import ppo_step

    policy, reward_model = models
    kwargs = {
        "policy_model": policy,
        "reward_model": reward_model,
        "ref_model": copy.deepcopy(policy),
        "prompts": PROMPTS,
    }
    kwargs[argument] = make(tiny_tokenizer, tiny_model_dir)
    with pytest.raises((TypeError, ValueError)) as info:
        ppo_step(**kwargs)
    assert argument in str(info.value) and expected in str(info.value), str(info.value)
    assert "_rlhf_ppo_trainer" not in policy.__dict__  # refused before any trainer was built


# ---------------------------------------------------------------------------------------------
# No "Loading weights" bar from transformers in library calls; a bar while pairs are made
# ---------------------------------------------------------------------------------------------


# huggingface_hub read HF_HUB_DISABLE_PROGRESS_BARS at import and warns; transformers' own switch,
# which its "Loading weights" bar follows, is turned on all the same.
@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")
def test_create_preference_dataset_draws_its_own_bar_and_not_transformers(
    tiny_model_dir, monkeypatch, capfd
):
    from transformers.utils import logging as hf_logging

    from rlhf.reward import preferences
    from rlhf.task import default

    monkeypatch.setattr(default, "base_model_dir", lambda *args, **kwargs: tiny_model_dir)
    bars = []
    original = preferences.progress_bar
    monkeypatch.setattr(
        preferences, "progress_bar", lambda *a, **k: bars.append(original(*a, **k)) or bars[-1]
    )
    # As in a fresh Python session: earlier CLI calls in this process turned the bars off.
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        records = preferences.create_preference_dataset(
            n_pairs=300, response_tokens=3, label_temperature=0
        )
        assert hf_logging.is_progress_bar_enabled()  # restored for the caller
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    (bar,) = bars
    assert bar.n == bar.total == 300 + 300 // 10 + 8  # every prompt sampled, over two chunks
    assert bar.desc.startswith("sample and label pairs (338 prompts for 300 pairs)")
    assert 0 < len(records) <= 300


@pytest.mark.parametrize("ceiling", [None, 0.961])
def test_train_reward_summary_says_what_the_accuracy_means(tmp_path, monkeypatch, capsys, ceiling):
    from rlhf.reward import train

    result = {"accuracy": 0.877, "ceiling": ceiling, "seconds": 3.0}
    monkeypatch.setattr(train, "train_reward", lambda cfg, **_: result)
    assert main(["train-reward", "--out", str(tmp_path / "rm")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "n/a" not in first and "ceiling" not in first, first
    if ceiling is None:  # the user's data: accuracy is agreement with their labels
        assert "the chosen response scores higher in that share of the held-out pairs" in first
    else:
        assert "gold judge" in first and "0.961" in first


def test_base_model_bar_starts_its_clock_after_the_first_step(monkeypatch):
    """tqdm's first ETA is (steps - 1) x the first step, the slowest of a fresh process; the bar
    is made after that step (counted as done, not timed), so the first ETA comes from step 2."""
    from rlhf import tracking
    from rlhf.task import default

    events, bars = [], []
    lm_loss, make_bar = default._lm_loss, tracking.progress_bar

    def loss(*args, **kwargs):
        events.append("step")
        return lm_loss(*args, **kwargs)

    def bar(*args, **kwargs):
        events.append("bar")
        bars.append(make_bar(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(default, "_lm_loss", loss)
    monkeypatch.setattr(tracking, "progress_bar", bar)
    cfg = default.BaseModelConfig(
        n_reviews=200, vocab_size=300, n_layer=1, n_embd=16, n_head=1, steps=3, batch_size=8
    )
    default.pretrain_base_model(cfg, progress=True)
    assert events[:3] == ["step", "bar", "step"]
    (pretrain,) = bars
    assert (pretrain.n, pretrain.total) == (3, 3)
    assert pretrain.format_dict["initial"] == 1  # the rate leaves the first step out


def test_a_new_log_replaces_the_folders_tensorboard_files(tmp_path):
    """`rlhf train-reward` run again in a folder (and any new RunLogger) leaves one event file."""
    from rlhf.tracking import RunLogger

    for _ in range(3):
        with RunLogger(tmp_path) as logger:
            logger.log(0, {"reward/loss": 0.5})
    assert len(_events(tmp_path)) == 1
    with RunLogger(tmp_path, append=True) as logger:  # a resumed run adds to its own log
        logger.log(1, {"reward/loss": 0.4})
    assert len(_events(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------
# A run that learns nothing says so: the stall warning, and LoRA's own default learning rate
# ---------------------------------------------------------------------------------------------


def test_stalled_warns_once_after_ten_flat_steps():
    from rlhf.rl.config import PPORunConfig
    from rlhf.rl.run import STALL_STEPS, stalled

    full, lora = PPORunConfig(lr=3e-5), PPORunConfig(lora_r=8, lr=3e-5)
    flat = [0.002, -0.004, 0.001] + [0.003] * (STALL_STEPS - 3)
    assert "try a larger --lr than 3e-05" in stalled(flat, full)
    assert "a LoRA adapter needs a larger --lr" in stalled(flat, lora)
    assert "KL at most 0.004 nats" in stalled(flat, full)  # |k1| counts: it can dip below 0
    assert stalled(flat[:-1], full) is None and stalled([*flat, 0.0], full) is None  # once
    assert stalled([*flat[:-1], 0.02], full) is None  # it moved


def test_a_lora_run_gets_ten_times_the_learning_rate(tmp_path):
    from rlhf.rl.config import PPO_LORA_LR, PPO_LR, PPORunConfig

    for lora_r, lr in ((0, PPO_LR), (8, PPO_LORA_LR)):
        cfg = PPORunConfig(lora_r=lora_r)
        cfg.validate()
        assert cfg.lr == lr
    assert PPO_LORA_LR == pytest.approx(10 * PPO_LR)
    given = PPORunConfig(lora_r=8, lr=1e-3)
    given.validate()
    assert given.lr == 1e-3


def test_a_ppo_run_that_does_not_move_is_warned_about(tmp_path, inputs, capsys):
    out = tmp_path / "still"
    assert main(_ppo(inputs, out, "--steps", "10", "--lr", "1e-12")) == 0
    printed = capsys.readouterr().out
    assert printed.count("the policy has hardly moved from the reference") == 1, printed
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-12
    assert main(_ppo(inputs, tmp_path / "moves", "--steps", "10", "--lr", "3e-3")) == 0
    assert "hardly moved" not in capsys.readouterr().out
