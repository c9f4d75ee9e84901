"""Non-finite training steps and weights, decided and counted on the device (see :mod:`.trainer`).

:class:`StepHealth` counts skipped steps (the current run of them, the longest run, the total) in 0-d device
tensors; the trainer hands them to the log window's one host transfer and then calls
:meth:`StepHealth.skipped_since_check` (a warning naming how many) and :meth:`StepHealth.check`
(:class:`NonFiniteError` after ``optim.max_nonfinite_steps`` in a row, or for non-finite weights before a save).

Non-finite steps. A step whose loss or gradient norm is not finite (on any rank) is skipped, decided on
the device: the fused AdamW step gets the flag ``torch.amp.GradScaler`` hands it (:func:`~.optim.step_where`),
so parameters, moments and the step count stay exactly as they were, and the EMA update gets weight 0.
The iteration still advances, and with it the data stream and the LR schedule: the host cannot know a
step was skipped without waiting for the device, and a resumed run must draw what an uninterrupted one
would. Counters of skipped steps stay on the device and travel with the log window's transfer: each log
line (and checkpoint) with skipped steps warns once, naming how many; ``optim.max_nonfinite_steps`` in
a row stop the run with :class:`NonFiniteError` and no checkpoint. Being read only there, the stop may
come up to ``log_every`` steps after the limit was reached. A checkpoint is never written with
non-finite student or EMA weights (:class:`NonFiniteError` instead).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["NonFiniteError", "StepHealth", "named_weights", "nonfinite_weight_flags", "nonfinite_weights_listing"]


class NonFiniteError(RuntimeError):
    """Training stopped: too many non-finite steps in a row, or a checkpoint refused for non-finite weights."""


def named_weights(modules: Mapping[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """(prefix.name, local tensor) of every floating-point parameter of the modules (shards under FSDP2)."""
    out = []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if p.is_floating_point():
                out.append((f"{prefix}.{name}", (p.to_local() if hasattr(p, "to_local") else p).detach()))
    return out


def nonfinite_weight_flags(weights: list[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """The names of ``weights`` and a (N,) bool device tensor: True where that tensor holds inf or NaN."""
    names, tensors = zip(*weights)
    return list(names), torch.stack([~torch.isfinite(t).all() for t in tensors])


def nonfinite_weights_listing(weights: list[tuple[str, torch.Tensor]]) -> str:
    """One line naming the weight tensors that hold inf or NaN (a host read)."""
    names, flags = nonfinite_weight_flags(weights)
    bad = [name for name, flag in zip(names, flags.tolist()) if flag]
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return f"{len(bad)} weight tensor(s) hold inf or NaN: {', '.join(bad[:4])}{more}"


class StepHealth:
    """Counters of skipped (non-finite) steps on ``device`` and their host-side checks.

    Args:
        device: where the counters live.
        max_nonfinite_steps: skipped steps in a row that stop the run (0: never).
        is_main: whether this rank warns.
    """

    def __init__(self, device: torch.device, max_nonfinite_steps: int, is_main: bool) -> None:
        self.counters = {key: torch.zeros((), dtype=torch.int64, device=device) for key in ("run", "longest", "total")}
        self.limit = int(max_nonfinite_steps)
        self.is_main = is_main
        self.seen = 0  # the total at the last host check
        self.checked_at = 0  # the iteration of that check

    def count(self, ok: torch.Tensor | bool) -> None:
        """Count one step: ``ok`` (0-d bool, on the device, or a host bool) says it was applied."""
        c = self.counters
        if isinstance(ok, torch.Tensor):
            bad = ~ok
        else:  # decided on the host (an optimizer without a device skip flag)
            bad = torch.full((), not ok, dtype=torch.bool, device=c["total"].device)
        c["run"] = torch.where(bad, c["run"] + 1, 0)
        torch.maximum(c["longest"], c["run"], out=c["longest"])
        c["total"] += bad

    def tensors(self, weight_flags: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The counters as ``nonfinite_*`` 0-d tensors and, given the weights' flags, how many are not finite."""
        out = {f"nonfinite_{key}": value for key, value in self.counters.items()}
        if weight_flags is not None:
            out["nonfinite_weights"] = weight_flags.sum()
        return out

    def skipped_since_check(self, health: Mapping[str, float], done: int) -> int:
        """Steps skipped since the last check (``health``: :meth:`tensors` read on the host); warns when any."""
        total = int(round(health["nonfinite_total"]))
        skipped, self.seen = total - self.seen, total
        since, self.checked_at = self.checked_at, done
        if skipped and self.is_main:
            warnings.warn(
                f"{skipped} of the steps from iteration {since} to {done} had a non-finite loss or gradient norm and were "
                f"skipped (weights, AdamW state and EMA left as they were); {int(round(health['nonfinite_run']))} in a row "
                f"now, the run stops at optim.max_nonfinite_steps = {self.limit}" + (" (0: never)" if not self.limit else ""),
                RuntimeWarning,
                stacklevel=4,
            )
        return skipped

    def check(self, health: Mapping[str, float], done: int, weights_listing: Callable[[], str]) -> None:
        """:class:`NonFiniteError` for ``max_nonfinite_steps`` skipped steps in a row, or (if checked) non-finite weights."""
        longest = int(round(health["nonfinite_longest"]))
        if self.limit and longest >= self.limit:
            raise NonFiniteError(
                f"training stopped at iteration {done}: {longest} steps in a row had a non-finite loss or gradient norm "
                f"(optim.max_nonfinite_steps = {self.limit}; read at log lines and checkpoints only, so up to log_every - 1 "
                "more may have run). Nothing was saved. Lower optim.lr, set optim.grad_clip, check the data or the "
                "teacher, or resume from an earlier checkpoint"
            )
        if health.get("nonfinite_weights", 0) > 0:
            raise NonFiniteError(f"refusing to save a checkpoint at iteration {done}: {weights_listing()}")
