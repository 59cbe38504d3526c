"""`--config FILE.yaml`: options from a file, the command line over it, bad keys and values refused
in one line naming the file and line, and the config.yaml a run writes running it again."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf import cli
from rlhf.cli import build_parser, main
from rlhf.cli_config import read_config_file


def parsed(monkeypatch, argv: list[str]):
    """The options `rlhf ARGV` would run its command with (the command itself is not run)."""
    seen = []
    monkeypatch.setitem(cli.COMMANDS, argv[0], seen.append)
    assert main(argv) == 0
    return seen[0]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_file_values_reach_the_command_and_the_command_line_wins(tmp_path, monkeypatch):
    config = write(
        tmp_path / "x.yaml",
        "# a comment\nkl_coef: 0.05\nlr: 3e-5\nkl-estimator: k1\nadaptive_kl: true\n"
        "steps: 7\nmodel: null\nthreads: 1\n",
    )
    args = parsed(monkeypatch, ["ppo", "--config", str(config), "--steps", "3"])
    assert args.kl_coef == 0.05 and args.kl_estimator == "k1" and args.adaptive_kl is True
    assert args.lr == 3e-5 and isinstance(args.lr, float)  # PyYAML reads 3e-5 as text
    assert args.steps == 3  # the command line wins
    assert args.threads == 1 and args.model is None
    assert parsed(monkeypatch, ["ppo", "--config", str(config)]).steps == 7
    assert parsed(monkeypatch, ["ppo"]).kl_coef == 0.1  # the file changed nothing for good


def test_every_training_command_takes_a_config(tmp_path, monkeypatch):
    config = write(tmp_path / "x.yaml", "seed: 5\n")
    for command in ("demo", "sft", "train-reward", "ppo", "dpo", "sweep"):
        assert parsed(monkeypatch, [command, "--config", str(config)]).seed == 5, command
    for command in ("generate", "eval"):  # they take the policy folder on the command line
        assert parsed(monkeypatch, [command, "runs/x", "--config", str(config)]).seed == 5


def test_a_list_stands_for_a_comma_separated_option(tmp_path, monkeypatch):
    config = write(tmp_path / "s.yaml", "kl_coefs: [0, 0.1]\nalgos: gae,rloo\n")
    args = parsed(monkeypatch, ["sweep", "--config", str(config)])
    assert args.kl_coefs == "0,0.1" and args.algos == "gae,rloo"


def test_config_json_is_a_config_too(tmp_path, monkeypatch):
    """A run's config.json (its _environment note skipped) reads as --config."""
    saved = {"kl_coef": 0.2, "steps": 4, "_environment": {"torch": "2.x"}}
    config = write(tmp_path / "config.json", json.dumps(saved))
    args = parsed(monkeypatch, ["ppo", "--config", str(config)])
    assert (args.kl_coef, args.steps) == (0.2, 4)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("steps: 2\nkl_coeff: 0.1\n", "x.yaml:2: key 'kl_coeff': rlhf ppo has no such option; did you mean kl_coef?"),
        ("steps: 2.5\n", "x.yaml:1: key 'steps': expected a whole number, got 2.5"),
        ("lr: fast\n", "x.yaml:1: key 'lr': expected a number, got 'fast'"),
        ("adaptive_kl: sometimes\n", "x.yaml:1: key 'adaptive_kl': expected true or false"),
        ("dtype: float16\n", "x.yaml:1: key 'dtype': expected one of auto, float32, bfloat16"),
        ("steps: null\n", "x.yaml:1: key 'steps': needs a value (default: 100)"),
        ("seed: 1\n\nseed: 2\n", "x.yaml:3: key 'seed': given twice (first on line 1)"),
        ("kl_coef: [0.1, 0.2]\n", "x.yaml:1: key 'kl_coef': expected a single value"),
        ("config: other.yaml\n", "x.yaml:1: key 'config': not allowed"),
        ("- steps\n", "x.yaml:1: a config file is a mapping"),
        ("steps: 2\nlr: [1\n", "x.yaml:3: not valid YAML"),
        ("threads: -1\n", "x.yaml:1: key 'threads': must be 0 (automatic) or a positive count"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_naming_the_line(tmp_path, capsys, body, expected):
    config = write(tmp_path / "x.yaml", body)
    out = tmp_path / "run"
    assert main(["ppo", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert err.startswith("rlhf ppo: error: ") and str(tmp_path) in err
    assert not out.exists()  # refused before anything ran


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["dpo", "--config", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.yaml: no such file" in err


def test_an_empty_file_sets_nothing(tmp_path):
    command = build_parser().commands["ppo"]
    assert read_config_file(write(tmp_path / "e.yaml", "# nothing yet\n"), command) == {}


def tiny_ppo(ppo_inputs, out) -> list[str]:
    model, rm, prompts = ppo_inputs
    return [
        "ppo", "--model", str(model), "--reward-model", str(rm), "--prompts", str(prompts),
        "--steps", "2", "--batch-size", "4", "--minibatch-size", "2", "--response-tokens", "4",
        "--ppo-epochs", "1", "--kl-coef", "0.05", "--device", "cpu", "--threads", "1",
        "--out", str(out),
    ]  # fmt: skip


def step_metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_a_runs_config_yaml_runs_it_again(tmp_path, ppo_inputs, capsys):
    first = tmp_path / "first"
    assert main(tiny_ppo(ppo_inputs, first)) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["kl_coef"] == 0.05 and saved["steps"] == 2 and saved["threads"] == 1
    assert saved["lr"] == 3e-5  # resolved: the run's config says what the default stood for
    assert "resume" not in saved  # a rerun from it starts afresh
    assert "rlhf ppo --config" in (first / "config.yaml").read_text()  # says how to use it
    again = tmp_path / "again"
    assert main(["ppo", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    assert step_metrics(again) == step_metrics(first)
    rerun = yaml.safe_load((again / "config.yaml").read_text())
    assert rerun == {**saved, "out": str(again)}
    capsys.readouterr()


def test_the_sweep_and_the_demo_write_their_options(tmp_path):
    from rlhf.tracking import save_options

    save_options(tmp_path, "sweep", {"kl_coefs": "0,0.1", "seeds": 2, "cache_dir": None})
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# The options of this run") and "rlhf sweep --config" in text
    command = build_parser().commands["sweep"]
    values = read_config_file(tmp_path / "config.yaml", command)
    assert values["kl_coefs"] == "0,0.1" and values["seeds"] == 2 and values["cache_dir"] is None
