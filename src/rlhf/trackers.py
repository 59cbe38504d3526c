"""Where a run's metrics go besides `metrics.jsonl`: TensorBoard, Weights & Biases, MLflow, Trackio.

Each tracker gets the same namespaced metrics step by step, the resolved config at the start and
the figures at the end, through its own package (an optional extra: `pip install 'rlhf[wandb]'`).
A tracker is a small object with `log`, `log_figures` and `close`; `open_trackers` makes them from
`--report-to`. Each package keeps its own conventions for where runs go:
- tensorboard: `OUT/tensorboard/` (`tensorboard --logdir OUT`)
- wandb: the project `$WANDB_PROJECT` (default rlhf); `WANDB_MODE=offline` writes `OUT/wandb/`
  for `wandb sync` later
- mlflow: the experiment `$MLFLOW_EXPERIMENT_NAME` (default rlhf) on `$MLFLOW_TRACKING_URI`
- trackio: the project `$TRACKIO_PROJECT` (default rlhf), stored under `$TRACKIO_DIR`
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def parse_report_to(text: str) -> tuple[str, ...]:
    """`--report-to`: comma-separated trackers, or `none`; each one's package must be installed."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"--report-to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or none "
                "(several at once: --report-to tensorboard,wandb)"
            )
        if importlib.util.find_spec(PACKAGE[name]) is None:
            raise ConfigError(
                f"--report-to {name} needs the {PACKAGE[name]} package: pip install 'rlhf[{name}]'"
            )
    return names


@dataclass
class TrackingArgs:
    """The tracker options every training command shares (a base of its config)."""

    report_to: str = "tensorboard"
    """where the metrics, the config and the figures go besides metrics.jsonl: tensorboard, wandb, mlflow, trackio or none, several comma-separated (each needs its package: pip install 'rlhf[wandb]')"""
    run_name: str | None = None
    """the run's name in the trackers (default: the --out folder's name)"""

    def validate_tracking(self) -> None:
        parse_report_to(self.report_to)


def finite(metrics: dict) -> dict[str, float]:
    """The metrics a tracker can plot: NaN and infinities (a step without a value) left out."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def flat_config(config: dict) -> dict:
    """Scalar values only, nested dicts as `a/b` keys: what every tracker's config view shows."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in flat_config(value).items()})
        elif isinstance(value, (list, tuple)):
            flat[key] = ",".join(str(v) for v in value)
        else:
            flat[key] = value
    return flat


class TensorBoard:
    name = "tensorboard"
    run_id = None  # a resumed run appends to the same folder

    def __init__(self, out: Path, run_name: str, config: dict, resume_id: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        lines = [f"| {k} | {v} |" for k, v in flat_config(config).items()]
        self.writer.add_text("config", "| option | value |\n|---|---|\n" + "\n".join(lines), 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_figures(self, paths: list[Path], step: int) -> None:
        from matplotlib.image import imread

        for path in paths:
            image = imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]; alpha dropped
            self.writer.add_image(f"figures/{path.stem}", image, step, dataformats="HWC")

    def close(self) -> str | None:
        self.writer.flush()
        self.writer.close()
        return None  # rlhf's own messages already name the tensorboard folder


class WandB:
    name = "wandb"

    def __init__(self, out: Path, run_name: str, config: dict, resume_id: str | None = None):
        import wandb

        self.wandb = wandb
        # console="off": wandb would otherwise wrap stdout and stderr, and the progress bars with them.
        settings = wandb.Settings(console="off", quiet=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rlhf"), name=run_name, dir=str(out),
            config=config, settings=settings, reinit="create_new",
            id=resume_id, resume="allow" if resume_id else None,
        )  # fmt: skip
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_figures(self, paths: list[Path], step: int) -> None:
        self.run.log({f"figures/{p.stem}": self.wandb.Image(str(p)) for p in paths}, step=step)

    def close(self) -> str | None:
        offline = self.run.settings.mode in ("offline", "dryrun")
        where = self.run.settings.sync_dir if offline else self.run.url
        self.run.finish()
        if offline:
            return f"wandb: offline run in {where}; upload it with: wandb sync {where}"
        return f"wandb: {where}"


class MLflow:
    name = "mlflow"

    def __init__(self, out: Path, run_name: str, config: dict, resume_id: str | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf")
        try:
            found = self.client.get_experiment_by_name(experiment)
        except (ImportError, Exception) as exc:  # the store itself failed to open
            uri = self.client.tracking_uri
            raise ConfigError(
                f"--report-to mlflow: could not open the tracking store {uri} "
                f"({str(exc).splitlines()[0][:200]}); set MLFLOW_TRACKING_URI to your MLflow server, "
                "or install the full mlflow package for its default sqlite store"
            ) from None
        if resume_id:  # a resumed run continues its MLflow run (its params are already there)
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            return
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
        for s in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[s : s + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=rows)

    def log_figures(self, paths: list[Path], step: int) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def close(self) -> str | None:
        self.client.set_terminated(self.run_id)
        return f"mlflow: run {self.run_id} on {self.client.tracking_uri}"


class Trackio:
    name = "trackio"

    def __init__(self, out: Path, run_name: str, config: dict, resume_id: str | None = None):
        self.project = os.environ.get("TRACKIO_PROJECT", "rlhf")
        self.run_name = self.run_id = resume_id or run_name
        with _quiet():  # trackio prints a dashboard banner on every init
            import trackio

            self.trackio = trackio
            self.run = trackio.init(
                project=self.project, name=self.run_name, config=flat_config(config),
                auto_log_cpu=False, auto_log_gpu=False, resume="allow" if resume_id else "never",
            )  # fmt: skip

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_figures(self, paths: list[Path], step: int) -> None:
        self.run.log({f"figures/{p.stem}": self.trackio.Image(str(p)) for p in paths}, step=step)

    def close(self) -> str | None:
        with _quiet():
            self.run.finish()
            # trackio finishes its current run again at exit (and says so) unless it is cleared.
            if self.trackio.context_vars.current_run.get() is self.run:
                self.trackio.context_vars.current_run.set(None)
        return (
            f'trackio: run {self.run_name}; view it with: trackio show --project "{self.project}"'
        )


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def open_trackers(
    names: tuple[str, ...], out: Path, run_name: str, config: dict, ids: dict | None = None
) -> list:
    """One started tracker per name, continuing the run `ids[name]` where given (a resumed run);
    if one fails to start, those already started are closed."""
    started = []
    try:
        for name in names:
            started.append(KINDS[name](out, run_name, config, (ids or {}).get(name)))
    except BaseException:
        for tracker in started:
            with contextlib.suppress(Exception):
                tracker.close()
        raise
    return started
