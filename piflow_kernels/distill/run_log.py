"""The run's log: a window of step metrics reduced at ``log_every``, written to stdout, JSONL and TensorBoard.

    >>> window = MetricsWindow()
    >>> window.add(trainer.train_step())             # every step: sums of 0-d tensors stay on the device
    >>> record = window.reduce(ctx, iteration)       # at log_every: the one host read of the window
    >>> run_log.log(record, format_record(record, target))

Named ``run_log`` so that it never shadows the standard library's ``logging``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from piflow_kernels.distill.ddp import DistContext

__all__ = ["MetricsWindow", "RunLog", "ProgressBar", "format_record"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsWindow:
    """Running sums of the step logs since the last log line. Losses and norms arrive as 0-d tensors and are
    summed on their device in float64 (reading them back would stall the device every step); settings such
    as ``lr`` arrive as floats. Float64 sums in step order give the same numbers as Python floats would."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0
        self.start = time.perf_counter()

    def __len__(self) -> int:
        return self.count

    def add(self, logs: dict[str, torch.Tensor | float]) -> None:
        """Fold in one step's logs (values: 0-d tensors or numbers; anything else is skipped)."""
        for key, value in logs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
            elif not _is_number(value):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def reduce(self, ctx: DistContext, iteration: int, latest: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Mean of every key over the window and over ranks, and ``it_per_s``; starts a new window.

        ``latest`` adds device values read as they are now (not averaged over the window, only over ranks),
        such as the trainer's counters of skipped steps. All tensor sums and ``latest`` come back to the
        host in one transfer: the one host sync per log line.
        """
        latest = dict(latest or {})
        keys = [key for key, value in self.sums.items() if isinstance(value, torch.Tensor)]
        tensors = [self.sums[key] for key in keys] + list(latest.values())
        values: list[float] = []
        if tensors:
            device = tensors[0].device
            values = torch.stack([t.detach().reshape(()).to(device, torch.float64) for t in tensors]).tolist()
        sums = {**self.sums, **dict(zip(keys, values))}
        n = max(self.count, 1)
        record: dict[str, Any] = {key: ctx.all_reduce_mean(v / n) for key, v in sorted(sums.items())}
        record.update({key: ctx.all_reduce_mean(v) for key, v in zip(latest, values[len(keys) :])})
        record["it_per_s"] = self.count / max(time.perf_counter() - self.start, 1e-9)
        self.sums, self.count, self.start = {}, 0, time.perf_counter()
        return {"iteration": iteration, **record}


class RunLog:
    """stdout (above the progress bar, if any) + ``<out_dir>/log.jsonl`` (+ TensorBoard), rank 0 only.

    ``tensorboard``: "auto" writes TensorBoard logs when the tensorboard package (no dependency of this
    library) is installed and nothing otherwise; True the same, with one warning naming the package when
    it is missing or fails; False none.
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool | str = "auto") -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "log.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception as err:  # tensorboard is optional
                self.tb = None
                if tensorboard is True:
                    warnings.warn(
                        f"tensorboard = true but TensorBoard logging is unavailable ({type(err).__name__}: {err}): "
                        "no TensorBoard logs for this run. Install the tensorboard package, or set tensorboard = "
                        "false (or 'auto', which skips it silently)",
                        RuntimeWarning,
                        stacklevel=2,
                    )

    def log(self, record: dict[str, Any], line: str | None = None, bar: Any = None) -> None:
        """Write ``record`` (a dict with ``iteration``) as one JSON line; print ``line`` if given (above the
        tqdm ``bar``, if any, so the bar is not broken)."""
        if not self.enabled:
            return
        if line is not None:
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and _is_number(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def format_record(record: dict[str, Any], target: int | None = None) -> str:
    """One console line of a record: ``it 50/200 | loss 0.0123 | lr 1.00e-03 | 12.34 it/s``."""
    it = record["iteration"]
    parts = [f"it {it}" + (f"/{target}" if target else "")]
    for key, value in record.items():
        if key == "iteration" or not _is_number(value):
            continue
        if key == "it_per_s":
            parts.append(f"{value:.2f} it/s")
        elif key == "lr":
            parts.append(f"lr {value:.2e}")
        else:
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)


class ProgressBar(contextlib.AbstractContextManager):
    """A tqdm bar on stderr from ``initial`` to ``total`` steps, or nothing when not ``enabled``
    (progress off, or not rank 0). ``tqdm`` is the bar itself (None when disabled)."""

    def __init__(self, enabled: bool, total: int, initial: int = 0, desc: str | None = None) -> None:
        self.tqdm = None
        if enabled:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        if self.tqdm is not None:
            self.tqdm.update(n)

    def set_postfix(self, **kwargs: Any) -> None:
        if self.tqdm is not None:
            self.tqdm.set_postfix(**kwargs)

    def __exit__(self, *exc) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
