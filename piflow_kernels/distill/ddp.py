"""Distributed training helpers: process group set-up, DDP and FSDP2 wrapping, gradient-sync control.

Launch the trainer with ``torchrun --nproc_per_node=N`` and it runs data-parallel: the process group
uses nccl on CUDA and gloo on CPU, each rank draws its own shard of every global batch, and
gradients are averaged across ranks (DDP), or parameters, gradients and optimizer state are sharded
(FSDP2, ``[distributed] mode = "fsdp"``, for students too large to replicate).

    >>> ctx = init_distributed(cfg.distributed, cfg.device)
    >>> model = wrap_model(student, ctx, cfg.distributed)
    >>> with grad_sync(model, ctx, enabled=False):  # accumulate locally
    ...     loss.backward()
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "init_distributed",
    "fully_shard_fn",
    "wrap_model",
    "unwrap_model",
    "grad_sync",
    "model_state_dict",
    "load_model_state_dict",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
]


@dataclass
class DistContext:
    """Where this process sits: rank, world size, device and the wrapping mode ("none", "ddp", "fsdp")."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.mode != "none"

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a Python float over ranks (for logging)."""
        if not (dist.is_available() and dist.is_initialized()) or self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(cfg, device: str = "auto") -> DistContext:
    """Join (or create) the process group when launched by torchrun; single-process otherwise.

    Args:
        cfg: a :class:`~piflow_kernels.distill.config.DistributedConfig` (mode, backend).
        device: "auto", "cpu", "cuda" or "cuda:N" ("cuda" means cuda:LOCAL_RANK).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    mode = cfg.mode
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "none"
    if mode == "none" and world_size > 1:
        raise RuntimeError(f"distributed.mode = 'none' but WORLD_SIZE={world_size}: use 'ddp', 'fsdp' or 'auto'")
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if mode == "none":
        return DistContext(device=dev)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    owns = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            # a one-process group (e.g. to exercise the FSDP path without torchrun)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        kwargs = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": datetime.timedelta(minutes=30)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        owns = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        mode=mode,
        backend=backend,
        owns_group=owns,
    )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fully_shard_fn():
    """``fully_shard`` (FSDP2) of this PyTorch, or None (it moved from torch.distributed._composable.fsdp in 2.6)."""
    try:
        from torch.distributed.fsdp import fully_shard

        return fully_shard
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import fully_shard

        return fully_shard
    except ImportError:
        return None


def _is_fsdp_module(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync") and hasattr(model, "reshard")


def _reshard_after_forward(module: nn.Module, args: object, output: object) -> None:
    _reshard(module)


def _reshard(model: nn.Module) -> None:
    """Register every FSDP2 module's sharded parameters again (a no-op for the others, and when already sharded).

    The FSDP2 root keeps its parameters gathered after a forward, for the backward that usually follows; a forward
    without one (the tied teacher, an evaluation under ``no_grad``), or submodules with ``reshard_after_forward =
    False``, leave the module holding plain gathered tensors in place of its DTensor shards. A state dict taken then
    misses the optimizer's parameters, and weights loaded into the shards would be shadowed by the stale gathered copy.
    """
    for module in model.modules():
        if _is_fsdp_module(module):
            module.reshard()


def wrap_model(model: nn.Module, ctx: DistContext, cfg, *, trainable: bool = True) -> nn.Module:
    """Wrap the (already on-device) student for ``ctx.mode``.

    "ddp": ``DistributedDataParallel`` (gradients all-reduced and averaged in backward).
    "fsdp": FSDP2 ``fully_shard`` on every submodule whose class name is in ``cfg.fsdp_modules`` (with
    ``reshard_after_forward = cfg.fsdp_reshard_after_forward``), then on the root; the module is
    modified in place and returned. ``trainable=False`` (the EMA copy)
    skips DDP, which only matters for gradients; under FSDP2 such a module is resharded whenever its forward returns
    (no backward follows to do it, and the EMA update writes into the shards: see :func:`_reshard`).
    """
    if ctx.mode == "none":
        return model
    if ctx.mode == "ddp":
        if not trainable:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters)
    if ctx.mode == "fsdp":
        fully_shard = fully_shard_fn()
        if fully_shard is None:
            raise RuntimeError(f"distributed.mode = 'fsdp' needs FSDP2 (fully_shard, PyTorch >= 2.4), not in {torch.__version__}")
        wanted = set(cfg.fsdp_modules)
        targets = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
        found = {type(m).__name__ for m in targets}  # before fully_shard renames the classes (FSDP<name>)
        for module in targets:
            fully_shard(module, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        missing = wanted - found
        if missing:
            raise ValueError(f"distributed.fsdp_modules: no submodule of class {sorted(missing)} in {type(model).__name__}")
        fully_shard(model)
        if not trainable:
            model.register_forward_hook(_reshard_after_forward)  # after FSDP2's own post-forward hook
        return model
    raise ValueError(f"unknown distributed mode {ctx.mode!r}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 modules are their own unwrapped selves)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, ctx: DistContext, enabled: bool) -> Iterator[None]:
    """Within this block, backward passes (and the forwards before them) sync gradients iff ``enabled``.

    Use ``enabled=False`` for every micro-batch but the last of an accumulation window.
    """
    if enabled or ctx.mode == "none":
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if _is_fsdp_module(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def _dcp_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def model_state_dict(model: nn.Module, ctx: DistContext, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of the unwrapped model; under FSDP only rank 0 gets the tensors.

    ``keys`` (parameter names): only those parameters, and every buffer (a LoRA student's checkpoint leaves the
    frozen base out: it is the teacher's, loaded again on resume). Under FSDP2 each such parameter is gathered
    on its own (collective: every rank calls this), never the whole model.
    """
    model = unwrap_model(model)
    _reshard(model)
    if keys is not None:
        out: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if name in keys:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[name] = full.detach().cpu()
        out.update({name: b.detach().cpu() for name, b in model.named_buffers()})
        return out if (ctx.mode != "fsdp" or ctx.is_main) else {}
    if ctx.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_dcp_options(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], ctx: DistContext, keys: set[str] | None = None
) -> None:
    """Load a full state dict (as saved by :func:`model_state_dict`) into a plain, DDP or FSDP2 model.

    With ``keys``, ``state`` holds exactly those parameters and the buffers (what :func:`model_state_dict` saved
    with them); the other parameters are left as they are. Anything missing or unexpected is an error.
    """
    model = unwrap_model(model)
    _reshard(model)
    if keys is not None:
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        want = set(keys) | set(buffers)
        missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
        if missing or unexpected:
            raise KeyError(f"checkpoint weights do not match the trained parameters: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")  # fmt: skip
        with torch.no_grad():
            for name in sorted(keys):
                p, value = params[name], state[name]
                if hasattr(p, "device_mesh"):  # an FSDP2 shard: this rank's part of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
                    p.to_local().copy_(value.to_local())
                else:
                    p.copy_(value.to(p.device, p.dtype))
            for name, b in buffers.items():
                b.copy_(state[name].to(b.device, b.dtype))
        return
    if ctx.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_dcp_options(full_state_dict=True, strict=True))
        return
    model.load_state_dict(state, strict=True)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    """Optimizer state: keyed by parameter index (``optimizer.state_dict()``) in one process and under DDP; under
    FSDP gathered to a full, FQN-keyed dict on rank 0. :func:`load_optimizer_state_dict` takes either in any mode."""
    if ctx.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        _reshard(unwrap_model(model))
        return get_optimizer_state_dict(
            unwrap_model(model), optimizer, options=_dcp_options(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


# param-group keys that choose the optimizer's implementation, not the training: the loading optimizer keeps its own
# (a one-process checkpoint holds fused=True, which FSDP2's DTensor parameters do not take)
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, ctx: DistContext) -> None:
    """Load what :func:`optimizer_state_dict` saved, in any mode: a one-process or DDP checkpoint (keyed by
    parameter index) resumes under FSDP2 and an FSDP2 one (keyed by parameter name) in one process or under DDP.
    Indices are positions in the optimizer's parameter list, which the trainer builds in the model's parameter order."""
    model = unwrap_model(model)
    _reshard(model)
    state = _keyed_for(state, model, optimizer, by_name=ctx.mode == "fsdp")
    if ctx.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_dcp_options(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def _keyed_for(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, by_name: bool) -> dict:
    """``state`` keyed by parameter name (``by_name``) or by index, with this optimizer's implementation keys."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return state  # not a state this optimizer takes: its own load_state_dict says why
    groups = [{**g, **{k: mine[k] for k in _IMPLEMENTATION_KEYS if k in mine}} for g, mine in zip(groups, optimizer.param_groups)]
    saved_by_name = any(isinstance(i, str) for g in groups for i in g["params"])
    if saved_by_name == by_name:
        return {**state, "param_groups": groups}
    ids = {id(p): name for name, p in model.named_parameters()}
    names = [ids.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    if None in names:
        raise RuntimeError("the optimizer holds a tensor that is not a parameter of the model: its state has no name")
    if by_name:
        key = names.__getitem__
    else:
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(i) for g in groups for i in g["params"]} - set(index))
        if unknown:
            raise KeyError(f"the optimizer state names parameters the model does not train: {unknown[:5]}")
        key = index.__getitem__
    return {
        "state": {key(k): v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [key(i) for i in g["params"]]} for g in groups],
    }
