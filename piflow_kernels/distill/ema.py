"""Exponential moving average of the student's weights; the EMA copy is the model that is evaluated.

    >>> ema = EMA(student, decay=0.999)
    >>> for it in range(n):
    ...     train_step(); ema.update(student, it)
    >>> samples = sample(ema.module, noise)

The EMA keeps its own module (a deep copy of the student, frozen, in eval mode), so it can be
handed to the sampler as is. Parameters the student does not train (a LoRA student's frozen base, a tied
teacher's output layer) are not copied: the EMA module holds the very same tensors, so a 12B base is in
memory once. Updates run in place with ``lerp_`` in the student's dtype. Under
FSDP2 both modules are sharded alike, so the update runs on the local shards.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "ema_decay"]


def ema_decay(iteration: int, decay: float, start_iter: int = 0, policy: str = "fixed", gamma: float = 7.0) -> float:
    """Decay applied by the update after step ``iteration`` (0-based); 0 before ``start_iter`` (copy).

    "fixed": ``decay``. "karras": ``min((1 - 1/t)^(gamma + 1), decay)``, t = iteration + 1 - start_iter,
    which averages over a window growing with training (the official configs' momentum policy).
    """
    if iteration < start_iter:
        return 0.0
    if policy == "fixed":
        return float(decay)
    if policy == "karras":
        t = max(iteration + 1 - start_iter, 1)
        return float(min((1.0 - 1.0 / t) ** (gamma + 1.0), decay))
    raise ValueError(f"EMA policy must be 'fixed' or 'karras', got {policy!r}")


class EMA:
    """EMA of a module's floating-point parameters; buffers are copied.

    Args:
        model: the student (unwrapped: not the DDP wrapper).
        decay: decay per step in [0, 1).
        start_iter: before this iteration the EMA copies the model.
        policy: "fixed" or "karras" (see :func:`ema_decay`).
        gamma: the karras exponent.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.999, start_iter: int = 0, policy: str = "fixed", gamma: float = 7.0
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        ema_decay(0, decay, start_iter, policy, gamma)  # validates the policy
        self.decay = float(decay)
        self.start_iter = int(start_iter)
        self.policy = policy
        self.gamma = float(gamma)
        # frozen parameters never change: share them (deepcopy's memo maps each to itself) instead of copying
        memo = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(model, memo)
        self.module.eval()
        self.module.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int, ok: bool | torch.Tensor = True) -> float:
        """Fold the model's current weights in, after optimizer step ``iteration``; returns the decay used.

        ``ok`` False (a skipped step) leaves the EMA as it is. A 0-d bool tensor decides on the device without
        being read: the weight of the update becomes ``ok * (1 - decay)``, and an update of weight 0 leaves
        every EMA entry bit for bit as it was when the model's weights are finite (``ema + 0 * (w - ema)``;
        a non-finite weight would leak in, and the trainer refuses to save such weights). Before
        ``start_iter`` (a copy) the tensor selects with ``torch.where``. ``num_updates`` counts calls.
        """
        beta = ema_decay(iteration, self.decay, self.start_iter, self.policy, self.gamma)
        self.num_updates += 1
        if ok is False:
            return beta
        gate = ok if isinstance(ok, torch.Tensor) else None
        weights: dict[torch.dtype, torch.Tensor] = {}  # ok * (1 - beta) per parameter dtype (lerp_ wants it alike)
        src = dict(model.named_parameters())
        for name, p_ema in self.module.named_parameters():
            p = src[name]
            if not p.requires_grad:
                continue
            value = p.detach().to(p_ema.dtype)
            if gate is None:
                if beta == 0.0:
                    p_ema.copy_(value)
                else:
                    p_ema.lerp_(value, 1.0 - beta)
            elif beta == 0.0:
                p_ema.copy_(torch.where(gate, value, p_ema))
            else:
                if p_ema.dtype not in weights:
                    weights[p_ema.dtype] = gate.to(p_ema.dtype) * (1.0 - beta)
                p_ema.lerp_(value, weights[p_ema.dtype])
        src_buffers = dict(model.named_buffers())
        for name, b_ema in self.module.named_buffers():
            if name in src_buffers:
                b_ema.copy_(src_buffers[name] if gate is None else torch.where(gate, src_buffers[name], b_ema))
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA module's weights (what a checkpoint stores in safetensors)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)

    def meta_state(self) -> dict[str, int | float | str]:
        """Counters and settings, for the trainer's torch state file."""
        return {"num_updates": self.num_updates, "decay": self.decay, "start_iter": self.start_iter}

    def load_meta_state(self, meta: dict) -> None:
        self.num_updates = int(meta.get("num_updates", 0))
