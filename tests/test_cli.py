"""The command line itself: suggestions for typos, the help of every command, thread control."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf import machine
from rlhf.cli import _count, _set_threads, build_parser, main


def test_a_misspelt_option_gets_the_nearest_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ppo", "--lora-rr", "3", "--stepz", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "--lora-rr: did you mean --lora-r?" in err
    assert "--stepz: did you mean --steps?" in err


def test_an_option_nothing_resembles_gets_no_guess(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--zzzzzz", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzzzz 1" in err and "did you mean" not in err


def test_a_misspelt_command_gets_the_nearest_one():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["trian-reward"])
    assert exit_info.value.code == 2


def test_a_misspelt_command_is_named(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ppoo"])
    assert "did you mean 'ppo'?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "sft", "train-reward", "ppo", "dpo", "plot", "sweep"])
def test_every_command_help_ends_with_examples(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    examples = out.split("examples:", 1)
    assert len(examples) == 2, f"rlhf {command} --help has no examples"
    assert f"rlhf {command}" in examples[1]


def test_ppo_help_lists_no_option_it_can_only_refuse(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ppo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--top-k", "--top-p", "--lora-dropout"):
        assert flag not in out
    # Still parsed, so that the refusal explains itself instead of "unrecognized arguments".
    args = build_parser().parse_args(["ppo", "--top-p", "0.9"])
    assert args.top_p == 0.9


def test_ppo_help_groups_stay_small(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ppo", "--help"])
    out = capsys.readouterr().out
    sections = out.split("\n\n")
    counts = {
        s.splitlines()[0]: sum(line.startswith("  --") for line in s.splitlines()) for s in sections
    }
    assert max(counts.values()) <= 16, counts


def test_refused_top_p_says_why(capsys):
    assert main(["ppo", "--top-p", "0.9", "--steps", "1"]) == 2
    assert "full softmax" in capsys.readouterr().err


def test_counts_agree_with_their_nouns():
    assert _count(1, "step") == "1 step"
    assert _count(2, "step") == "2 steps"
    assert _count(6608, "pair") == "6,608 pairs"


# -- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "busy", "threads"),
    [
        (2, 0.0, 2),  # quiet: every core
        (2, 0.2, 2),  # a little background work leaves the core usable
        (2, 0.3, 1),  # a core kept a third busy is taken
        (2, 1.0, 1),
        (2, 2.0, 1),  # fully taken: still one thread, never zero
        (2, 5.0, 1),
        (16, 3.1, 13),  # 3.1 busy: three cores taken, the fourth only a tenth busy
        (4, None, 4),  # load unknown: torch's own choice
    ],
)
def test_threads_follow_the_idle_cores(cores, busy, threads):
    assert machine.free_cores_threads(cores, busy) == threads


def test_busy_cores_sees_a_burner():
    """Another process spinning on a core is counted (however busy the machine is otherwise, the
    burner gets a share of a core, and the count only grows with the rest of the load)."""
    if machine._cpu_times() is None:
        pytest.skip("no /proc/stat here")
    burner = subprocess.Popen(
        [sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert (
            burner.stdout.readline() == "spinning\n"
        )  # it spins from here on, however slow its start
        busy = machine.busy_cores(sample_s=0.5)
    finally:
        burner.kill()
        burner.wait()
    assert busy is not None and busy >= 0.3


def test_threads_option_wins(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)  # so that each call below has to change it
        _set_threads(1)
        assert torch.get_num_threads() == 1
        assert machine.CHOSEN == "--threads"
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        _set_threads(0)  # automatic, but the environment says 1
        assert torch.get_num_threads() == 1
        assert machine.CHOSEN == "$OMP_NUM_THREADS"
    finally:
        torch.set_num_threads(before)
        machine.CHOSEN = None


def test_automatic_threads_never_exceed_the_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        _set_threads(0)
        assert 1 <= torch.get_num_threads() <= machine.usable_cores()
        assert "cores" in machine.CHOSEN
    finally:
        torch.set_num_threads(before)
        machine.CHOSEN = None


def test_negative_threads_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["ppo", "--threads", "-2"])
    assert exit_info.value.code == 2
    assert "--threads: must be 0 (automatic) or a positive count" in capsys.readouterr().err


def test_the_run_records_its_threads(tmp_path, ppo_inputs):
    tiny_policy_dir, tiny_reward_dir, prompts_file = ppo_inputs
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhf", "ppo", "--model", str(tiny_policy_dir),
           "--reward-model", str(tiny_reward_dir), "--prompts", str(prompts_file),
           "--steps", "1", "--batch-size", "4", "--minibatch-size", "4", "--response-tokens", "4",
           "--out", str(out), "--threads", "1"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    saved = json.loads((out / "config.json").read_text())["_environment"]
    assert saved["threads"] == 1 and saved["threads_chosen"] == "--threads"


def test_help_imports_no_torch():
    """`rlhf --help` and every command's --help answer without importing torch or transformers
    (seconds on a laptop; the options come from config dataclasses that need neither)."""
    code = (
        "import sys\n"
        "from rlhf.cli import main\n"
        "for argv in ([], ['--help'], *([c, '--help'] for c in "
        "('demo', 'train-reward', 'ppo', 'dpo', 'plot', 'sweep', 'serve-reward'))):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'numpy') "
        "if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "HEAVY []" in done.stderr, done.stderr[-2000:]


def test_a_grpo_lora_run_says_grpo_and_leaks_no_library_warning(tmp_path, ppo_inputs):
    """The bar and the summary name the method that ran, and neither transformers' nor PEFT's
    warnings (a LoRA wrap asks transformers a deprecated question) nor their loading bars reach
    the output, from the CLI or from a library call."""
    model, rm, prompts = ppo_inputs
    options = dict(model=str(model), reward_model=str(rm), prompts=str(prompts), steps=1,
                   batch_size=4, minibatch_size=4, response_tokens=4, ppo_epochs=1, lora_r=4,
                   advantage_estimator="grpo", samples_per_prompt=2, device="cpu")  # fmt: skip
    argv = [sys.executable, "-W", "default", "-m", "rlhf", "ppo", "--out", str(tmp_path / "cli")]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    assert "GRPO (kl_coef 0.1)" in done.stderr and "PPO (" not in done.stderr
    assert done.stdout.startswith("GRPO: 1 step in")
    code = (
        "from rlhf.rl.config import PPORunConfig\n"
        "from rlhf.rl.run import train_ppo\n"
        f"train_ppo(PPORunConfig(out={str(tmp_path / 'lib')!r}, **{options!r}))\n"
    )
    library = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
        timeout=300, check=True,
    )  # fmt: skip
    for err in (done.stderr, library.stderr):
        assert "Warning" not in err and "Loading weights" not in err, err[-2000:]
