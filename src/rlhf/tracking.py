"""Run bookkeeping: seeds, the resolved config beside the outputs, and metric logs.

Metrics go to `metrics.jsonl` (one flushed line per step, so a killed run keeps what it logged) and
to TensorBoard event files. Plots read `metrics.jsonl` after the run, never the live loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import random
import sys
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

    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return dataclasses.asdict(obj)
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    from . import __version__

    payload = plain(config)
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
    it, which therefore ran with the field's default."""
    changes = []
    for f in dataclasses.fields(config):
        old = saved.get(f.name, f.default)
        if old is not dataclasses.MISSING and old != getattr(config, f.name):
            changes.append((f.name, old, getattr(config, f.name)))
    return changes


class RunLogger:
    """Append metrics to `metrics.jsonl` and, optionally, TensorBoard.

    A new log (`append=False`) replaces the folder's earlier one, TensorBoard's event files
    included: TensorBoard reads every event file in the folder, so old ones would overlay the new
    run's curves with stale ones.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, append: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = JsonlWriter(self.out_dir / "metrics.jsonl", append=append)
        self._tb = None
        if not append:
            for old in (self.out_dir / "tensorboard").glob("events.out.tfevents.*"):
                old.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except (
                ImportError
            ):  # tensorboard is a dependency, but a broken install should not stop training
                self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else None
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._jsonl.write(row)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
