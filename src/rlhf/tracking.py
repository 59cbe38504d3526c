"""Run bookkeeping: seeds, the resolved config beside the outputs, and metric logs.

Metrics go to `metrics.jsonl` (one flushed line per step, so a killed run keeps what it logged) and
to TensorBoard event files. Plots read `metrics.jsonl` after the run, never the live loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import machine
from .data import JsonlWriter, atomic_write_json, atomic_write_text


def set_seed(seed: int) -> None:
    """One seed fixes Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Options that say how to start a run, not what the run is: a config.yaml that set them would
# make its rerun continue the original's checkpoints instead of running it again.
NOT_RERUN = ("resume", "auto_resume")


def _plain(obj):
    """A dataclass (or dataclasses in a dict) as plain dicts."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def save_config(
    out_dir: str | Path, config: Any, extra: dict | None = None, command: str | None = None
) -> None:
    """Write the resolved config (a dataclass, or dataclasses in a dict) as `config.json`; with
    `command` (a dataclass of that `rlhf` command's options), also as `config.yaml`, which
    `rlhf COMMAND --config` reads to run it again."""
    if command is not None and dataclasses.is_dataclass(config):
        options = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in NOT_RERUN
        }
        save_options(out_dir, command, options)

    from . import __version__

    payload = _plain(config)
    payload = dict(payload) if isinstance(payload, dict) else {"config": payload}
    payload["_environment"] = {
        "rlhf": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        **({"threads_chosen": machine.CHOSEN} if machine.CHOSEN else {}),
        **(extra or {}),
    }
    atomic_write_json(Path(out_dir) / "config.json", payload)


def save_options(out_dir: str | Path, command: str, options: dict) -> None:
    """`config.yaml`: the options of `rlhf COMMAND` that made the run in `out_dir`, resolved, plus
    the torch threads it ran with (a thread count can change the last bits of a sum)."""
    import yaml

    from . import __version__

    out = Path(out_dir)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    plain["threads"] = torch.get_num_threads()
    header = (
        f"# The options of this run (rlhf {__version__}). Run it again with:\n"
        f"#   rlhf {command} --config {out / 'config.yaml'} --out NEW_FOLDER\n"
        "# Options on the command line win over this file; threads: 0 picks the idle cores anew.\n"
    )
    text = header + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
    atomic_write_text(out / "config.yaml", text)


def option_changes(saved: dict, config: Any) -> list[tuple[str, Any, Any]]:
    """(field, saved value, value now) for each field of the dataclass `config` whose value differs
    from `saved` (a config.json read back). A field `saved` lacks came after the run that wrote
    it, which therefore ran with the field's default. A config class may translate what its
    earlier versions saved (its `saved_options`)."""
    upgrade = getattr(config, "saved_options", None)
    saved = upgrade(saved) if upgrade is not None else saved
    changes = []
    for f in dataclasses.fields(config):
        old = saved.get(f.name, f.default)
        if old is not dataclasses.MISSING and old != getattr(config, f.name):
            changes.append((f.name, old, getattr(config, f.name)))
    return changes


def tracking(cfg: Any, figures: Callable[[Path], list[Path]] | None = None) -> dict:
    """`RunLogger`'s tracker arguments from a config with `TrackingArgs`' fields."""
    return {"report_to": cfg.report_to, "config": cfg, "run_name": cfg.run_name, "figures": figures}


class RunLogger:
    """Append metrics to `metrics.jsonl` and to the trackers of `report_to` (`trackers`).

    A new log (`append=False`) replaces the folder's earlier one, TensorBoard's event files
    included: TensorBoard reads every event file in the folder, so old ones would overlay the new
    run's curves with stale ones. An appended log (a resumed run) continues the trackers' runs
    that `trackers.json` names. `config` (a dataclass or dict) goes to every tracker at the start;
    `figures`, called with the folder once the last metric is written, draws the figures that go
    to every tracker at the end of a run that finished without an error.
    """

    def __init__(
        self,
        out_dir: str | Path,
        tensorboard: bool = True,
        append: bool = False,
        report_to: str | tuple[str, ...] | None = None,
        config: Any = None,
        run_name: str | None = None,
        figures: Callable[[Path], list[Path]] | None = None,
    ):
        from .trackers import open_trackers, parse_report_to

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if report_to is None:
            report_to = ("tensorboard",) if tensorboard else ()
        names = parse_report_to(report_to) if isinstance(report_to, str) else tuple(report_to)
        if not append:
            for old in (self.out_dir / "tensorboard").glob("events.out.tfevents.*"):
                old.unlink()
        ids_path = self.out_dir / "trackers.json"
        ids = (
            json.loads(ids_path.read_text(encoding="utf-8"))
            if append and ids_path.is_file()
            else {}
        )
        self.trackers = open_trackers(
            names, self.out_dir, run_name or self.out_dir.name, _plain(config) or {}, ids
        )
        atomic_write_json(ids_path, {t.name: t.run_id for t in self.trackers if t.run_id})
        self._jsonl = JsonlWriter(self.out_dir / "metrics.jsonl", append=append)
        self._figures = figures
        self._last_step = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else None
        self._jsonl.write(row)
        shown = {k: v for k, v in row.items() if k != "step" and v is not None}
        for tracker in self.trackers:
            tracker.log(step, shown)
        self._last_step = max(self._last_step, step)

    def close(self, finished: bool = True) -> None:
        """Close the log; when `finished`, draw `figures` and send them to the trackers first."""
        self._jsonl.close()
        try:
            if finished and self._figures is not None and self.trackers:
                paths = self._figures(self.out_dir)
                for tracker in self.trackers:
                    tracker.log_figures(paths, self._last_step)
        finally:
            notes = [tracker.close() for tracker in self.trackers]
        for note in filter(None, notes):
            print(note)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(finished=exc_type is None)


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar that redraws at most once a second when stderr is not a terminal (CI logs)."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 5.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def quiet_transformers_bars():
    """transformers' own "Loading weights" and "Writing model shards" bars off inside the block.

    rlhf draws its own progress; the CLI turns these bars off for good, and this keeps them out of
    library calls too (restored on exit, since the caller may want them elsewhere).
    """
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
