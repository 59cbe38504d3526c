"""`--report-to`: every tracker, through its real package and offline, receives the same metrics,
the resolved config and the figures, read back from the tracker's own store."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.trackers import parse_report_to
from rlhf.tracking import RunLogger


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker writes under tmp_path and nothing reaches a network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 prefers a database
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio.sqlite_storage as storage
    import trackio.utils

    # trackio reads TRACKIO_DIR when it is imported; point the already-imported module there too.
    monkeypatch.setattr(trackio.utils, "TRACKIO_DIR", tmp_path / "trackio", raising=False)
    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio", raising=False)
    return tmp_path


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run, read from its .wandb file (LevelDB's log format: 32 KiB
    blocks of records with a 7-byte header, after the file's 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, pieces, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pieces = chunk
        elif kind in (3, 4):  # middle, last
            pieces += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def wandb_logged(run_dir: Path) -> tuple[dict, dict]:
    """({step: {metric: value}}, config) of an offline W&B run."""
    history, config = {}, {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                for i in record.history.item
            }
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return history, config


def mlflow_logged(run_id: str) -> tuple[dict, dict, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    history = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(m.step, {})[key] = m.value
    figures = [a.path for a in client.list_artifacts(run_id, "figures")]
    return history, run.data.params, figures


def trackio_logged(name: str) -> tuple[dict, dict]:
    from trackio.sqlite_storage import SQLiteStorage

    history = {}
    for row in SQLiteStorage.get_logs("rlhf", name):
        values = {k: v for k, v in row.items() if k not in ("step", "timestamp")}
        history.setdefault(row["step"], {}).update(values)
    return history, SQLiteStorage.get_run_config("rlhf", name)


def tensorboard_logged(run_dir: Path) -> tuple[dict, list[str], str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    history = {}
    for key in events.Tags()["scalars"]:
        for e in events.Scalars(key):
            history.setdefault(e.step, {})[key] = e.value
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return history, events.Tags()["images"], text


METRICS = [
    (0, {"objective/reward": 0.25, "objective/kl": 0.0, "loss/policy": float("nan")}),
    (1, {"objective/reward": 0.5, "objective/kl": 0.125, "loss/policy": -0.5}),
    (2, {"objective/reward": 0.75, "objective/kl": 0.5, "loss/policy": -0.25}),
]
CONFIG = {"kl_coef": 0.05, "lr": 3e-5, "model": None, "advantage_estimator": "grpo"}


def draw(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [0.25, 0.5, 0.75])
    path = run_dir / "curve.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


def expected(step: int) -> dict:
    return {k: v for k, v in METRICS[step][1].items() if v == v}  # NaN left out


def test_every_tracker_gets_the_metrics_config_and_figures(offline, capsys):
    run = offline / "run"
    with RunLogger(run, report_to="tensorboard,wandb,mlflow,trackio", config=CONFIG,
                   run_name="t1", figures=draw) as logger:  # fmt: skip
        for step, metrics in METRICS:
            logger.log(step, metrics)
    notes = capsys.readouterr().out
    assert "wandb sync" in notes and "trackio show" in notes and "mlflow: run" in notes
    ids = json.loads((run / "trackers.json").read_text())

    history, images, text = tensorboard_logged(run)
    assert {s: history[s] for s in range(3)} == {s: expected(s) for s in range(3)}  # exact in fp32
    assert images == ["figures/curve"] and "| kl_coef | 0.05 |" in text

    history, config = wandb_logged(run)
    assert {s: {k: v for k, v in history[s].items() if "/" in k and not k.startswith("figures")}
            for s in range(3)} == {s: expected(s) for s in range(3)}  # fmt: skip
    assert history[2]["figures/curve/_type"] == "image-file"
    assert (
        next(run.glob("wandb/offline-run-*")) / "files" / history[2]["figures/curve/path"]
    ).is_file()
    assert config["kl_coef"] == 0.05 and config["advantage_estimator"] == "grpo"

    history, params, figures = mlflow_logged(ids["mlflow"])
    assert history == {s: expected(s) for s in range(3)}
    assert params["kl_coef"] == "0.05" and params["model"] == "None"
    assert figures == ["figures/curve.png"]

    history, config = trackio_logged("t1")
    metrics = {
        s: {k: v for k, v in row.items() if not k.startswith("figures")}
        for s, row in history.items()
    }
    assert metrics == {s: expected(s) for s in range(3)}
    assert "figures/curve" in history[2] and config["lr"] == 3e-5


def test_a_resumed_log_continues_the_same_tracker_runs(offline, capsys):
    run = offline / "run"
    with RunLogger(run, report_to="mlflow,trackio", config=CONFIG, run_name="r") as logger:
        logger.log(0, METRICS[0][1])
    first = json.loads((run / "trackers.json").read_text())
    with RunLogger(run, append=True, report_to="mlflow,trackio", config=CONFIG) as logger:
        logger.log(1, METRICS[1][1])
    assert json.loads((run / "trackers.json").read_text()) == first
    history, _, _ = mlflow_logged(first["mlflow"])
    assert sorted(history) == [0, 1]
    assert sorted(trackio_logged("r")[0]) == [0, 1]
    capsys.readouterr()


def test_figures_are_not_drawn_for_a_run_that_failed(offline):
    drawn = []
    with (
        pytest.raises(RuntimeError),
        RunLogger(
            offline / "run", report_to="tensorboard", figures=lambda d: drawn.append(d) or []
        ) as logger,
    ):
        logger.log(0, {"x": 1.0})
        raise RuntimeError("the step failed")
    assert drawn == []


def test_report_to_is_checked_up_front(monkeypatch):
    assert parse_report_to("none") == ()
    assert parse_report_to("TensorBoard, wandb,wandb") == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match="unknown tracker 'comet'; choose from"):
        parse_report_to("tensorboard,comet")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install 'rlhf\[wandb\]'"):
        parse_report_to("wandb")


def test_report_to_none_writes_no_tensorboard(tmp_path):
    with RunLogger(tmp_path / "run", report_to="none") as logger:
        logger.log(0, {"x": 1.0})
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 0, "x": 1.0}\n'


def test_a_cli_run_reports_to_each_tracker(offline, ppo_inputs, capsys):
    """A real `rlhf ppo` to wandb and mlflow: the tracker's values are metrics.jsonl's, and the
    run's figures reach them at the end."""
    model, rm, prompts = ppo_inputs
    out = offline / "ppo"
    argv = [
        "ppo", "--model", str(model), "--reward-model", str(rm), "--prompts", str(prompts),
        "--steps", "2", "--batch-size", "4", "--minibatch-size", "2", "--response-tokens", "4",
        "--ppo-epochs", "1", "--device", "cpu", "--out", str(out),
        "--report-to", "wandb,mlflow", "--run-name", "cli-run",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "figures:" in printed and "wandb sync" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {
        r["step"]: {k: v for k, v in r.items() if k != "step" and v is not None} for r in rows
    }
    history, params, figures = mlflow_logged(
        json.loads((out / "trackers.json").read_text())["mlflow"]
    )
    assert history == logged
    assert params["report_to"] == "wandb,mlflow" and params["steps"] == "2"
    assert sorted(figures) == ["figures/reward_kl_tradeoff.png", "figures/training_diagnostics.png"]
    history, config = wandb_logged(out)
    assert history[1]["objective/reward"] == pytest.approx(logged[1]["objective/reward"])
    assert config["run_name"] == "cli-run"
    assert not (out / "tensorboard").exists()  # only the trackers asked for


def test_an_unknown_tracker_is_one_line_before_anything_runs(tmp_path, capsys):
    assert main(["ppo", "--report-to", "tensorbored", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown tracker 'tensorbored'" in err
    assert not (tmp_path / "r").exists()


def test_the_demo_and_the_sweep_check_their_trackers_first(tmp_path, capsys):
    for command in ("demo", "sweep"):
        out = tmp_path / command
        assert main([command, "--report-to", "tensorboard,comet", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown tracker 'comet'" in err, err
        assert not (out / "metrics.jsonl").exists()
