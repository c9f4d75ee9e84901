"""The pi-ID trainer: one process or torchrun DDP / FSDP2, deterministic and resumable bit-exactly.

    >>> cfg = TrainConfig.from_file("examples/distill_exact_teacher.toml")
    >>> trainer = Trainer(cfg)
    >>> trainer.train()                     # logs to stdout, <out_dir>/log.jsonl, TensorBoard
    >>> trainer = Trainer(cfg); trainer.resume(); trainer.train()   # continues where it stopped

Determinism. Every optimizer step ``it`` consumes ``world_size * grad_accum`` micro-batches. Micro-batch
``j`` of rank ``r`` is shard ``r * grad_accum + j`` of the global batch and draws everything (data,
noise, class labels, the loss's random times and dropout) from its own generator seeded by
``(seed, it, shard)``. No RNG state is carried from one step to the next, so a resumed run draws
exactly what an uninterrupted one would, and a run on N ranks sees the same global batch as one
process with ``grad_accum * N`` micro-batches (DDP averages gradients over ranks, accumulation
divides each micro-batch's loss by ``grad_accum``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from piflow_kernels.distill import checkpoint as ckpt
from piflow_kernels.distill.config import ConfigError, TrainConfig
from piflow_kernels.distill.ddp import (
    DistContext,
    grad_sync,
    init_distributed,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
    unwrap_model,
    wrap_model,
)
from piflow_kernels.distill.ema import EMA
from piflow_kernels.distill.optim import make_adamw

__all__ = [
    "Trainer",
    "build_teacher",
    "build_student",
    "build_data_source",
    "stream_seed",
    "energy_distance",
    "sliced_w2",
    "warmup_factor",
]


# ---------------------------------------------------------------------------------------------- seeding


def stream_seed(seed: int, iteration: int, shard: int, purpose: int = 0) -> int:
    """A 63-bit seed for the random stream of (seed, iteration, shard, purpose) (non-negative ints), via SeedSequence."""
    words = np.random.SeedSequence([int(seed), int(iteration), int(shard), int(purpose)]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    """LR multiplier at step ``iteration``: linear from ``warmup_ratio`` to 1 over ``warmup_iters``, then 1."""
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return 1.0
    return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters


# ---------------------------------------------------------------------------------------------- metrics


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` between two sample sets (n, ...) and (m, ...), float64."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sliced_w2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size sample sets (n, ...), over fixed random directions."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_w2 needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    dirs = torch.randn(x.shape[1], num_projections, generator=_generator(seed), dtype=torch.float64).to(x.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = torch.sort(x @ dirs, dim=0).values
    py = torch.sort(y @ dirs, dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


# ---------------------------------------------------------------------------------------------- builders


class _NullClassLabels(nn.Module):
    """Teacher wrapper mapping ``class_labels=None`` (the CFG unconditional branch) to the null class."""

    def __init__(self, teacher: nn.Module, null_class: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.null_class = int(null_class)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None, **kw: Any):
        if class_labels is None:
            class_labels = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
        return self.teacher(x_t, timestep, class_labels=class_labels, **kw)


def _exact_data(cfg: TrainConfig):
    from piflow_kernels.distill.teachers import GaussianMixtureData

    t, d = cfg.teacher, cfg.data
    return GaussianMixtureData.random(
        (d.channels, d.height, d.width),
        num_components=t.num_modes,
        spread=t.mode_scale,
        std=t.std,
        generator=_generator(t.seed),
    )


def _sample_size(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def build_teacher(cfg: TrainConfig) -> tuple[nn.Module, nn.Module | None, Any]:
    """Teacher from ``cfg.teacher``: (teacher callable, the raw diffusers model or None, exact data or None).

    The exact teacher's data doubles as the data source and the evaluation reference.
    """
    from piflow_kernels.distill.teachers import CFGTeacher, DiffusersTeacher, ExactGMTeacher

    t, d = cfg.teacher, cfg.data
    if t.kind == "exact":
        data = _exact_data(cfg)
        return ExactGMTeacher(data, num_train_timesteps=cfg.piid.num_train_timesteps), None, data
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - diffusers is a dependency
        raise ImportError("teacher.kind = 'diffusers' needs the diffusers package") from err
    model_cls = getattr(diffusers, t.model_class, None)
    if model_cls is None or not isinstance(model_cls, type):
        raise ConfigError(f"config key teacher.model_class: diffusers has no model class {t.model_class!r}")
    if t.pretrained:
        model = model_cls.from_pretrained(t.pretrained, local_files_only=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            try:
                model = model_cls(**t.model)
            except TypeError as err:
                raise ConfigError(f"config key teacher.model: {t.model_class}(**model) failed: {err}") from None
    conf = getattr(model, "config", None)
    if conf is not None:
        in_ch = getattr(conf, "in_channels", None)
        if in_ch is not None and in_ch != d.channels:
            raise ConfigError(f"config key data.channels = {d.channels} but the teacher takes in_channels = {in_ch}")
        size = getattr(conf, "sample_size", None)
        if size is not None and _sample_size(size) != (d.height, d.width):
            raise ConfigError(
                f"config keys data.height, data.width = ({d.height}, {d.width}) but the teacher's sample_size is {size}"
            )
    model.eval().requires_grad_(False)
    teacher: nn.Module = DiffusersTeacher(model, num_train_timesteps=cfg.piid.num_train_timesteps)
    if t.guidance_scale != 1.0:
        teacher = CFGTeacher(
            _NullClassLabels(teacher, d.num_classes),
            t.guidance_scale,
            tuple(t.guidance_interval) if t.guidance_interval else None,
            interval_unit="timestep",
            num_train_timesteps=cfg.piid.num_train_timesteps,
            uncond_kwargs={"class_labels": None},
        )
    data = _exact_data(cfg) if (d.mode == "data_dependent" and d.source == "exact") else None
    return teacher, model, data


def build_student(cfg: TrainConfig, teacher_model: nn.Module | None) -> nn.Module:
    """Student from ``cfg.student``, initialised from ``cfg.seed`` (identical on every rank)."""
    s, d = cfg.student, cfg.data
    policy_type = cfg.piid.policy_type
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if s.kind == "toy":
            from piflow_kernels.distill.toy import ToyDXStudent, ToyGMStudent

            common = {"hidden": s.hidden, "num_train_timesteps": cfg.piid.num_train_timesteps}
            if policy_type == "GMFlow":
                student = ToyGMStudent(d.channels, d.height, d.width, num_components=s.num_components, **common)
            else:
                student = ToyDXStudent(d.channels, d.height, d.width, num_points=s.num_points, **common)
        else:
            from piflow_kernels import students

            if s.init_from:
                student = students.PiFlowStudent.from_pretrained(s.init_from)
            else:
                extra = dict(s.kwargs)
                if policy_type == "GMFlow":
                    extra.setdefault("num_components", s.num_components)
                else:
                    extra.setdefault("num_points", s.num_points)
                student = students.build_student(teacher_model, policy_type=policy_type, **extra)
            student.requires_grad_(True)  # the trunk is a copy of the frozen teacher
    return student


class _ExactSource:
    """Data-dependent x0 drawn from the exact mixture (fresh samples every draw)."""

    def __init__(self, data) -> None:
        self.data = data

    def draw(self, n: int, generator: torch.Generator, iteration: int, shard: int, num_shards: int):
        return self.data.sample(n, generator=generator), None


class _TensorSource:
    """x0 from a tensor (N, C, H, W), in epochs of seeded permutations, sharded like DistributedSampler.

    Global stream position p of shard ``shard`` at step ``iteration`` is
    ``(iteration * num_shards + shard) * n + i``; epoch ``p // N`` uses the permutation seeded by
    ``(seed, epoch)``. Stateless, so resume and any sharding see the same stream.
    """

    def __init__(self, x0: torch.Tensor, labels: torch.Tensor | None, seed: int) -> None:
        self.x0 = x0
        self.labels = labels
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(self.x0.shape[0], generator=_generator(stream_seed(self.seed, epoch, 0, 7)))
        return self._perms[epoch]

    def draw(self, n: int, generator: torch.Generator, iteration: int, shard: int, num_shards: int):
        size = self.x0.shape[0]
        start = (iteration * num_shards + shard) * n
        pos = torch.arange(start, start + n)
        idx = torch.stack([self._perm(int(p) // size)[int(p) % size] for p in pos])
        labels = None if self.labels is None else self.labels[idx]
        return self.x0[idx], labels


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config key data.path: no file {path!r}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {"x0": obj}
    if isinstance(obj, dict):
        return obj
    raise ConfigError(f"config key data.path: {path!r} must hold a tensor or a dict with key 'x0'")


def build_data_source(cfg: TrainConfig, exact_data: Any):
    """The x0 source of data-dependent pi-ID (None in data-free mode)."""
    d = cfg.data
    if d.mode == "data_free":
        return None
    if d.source == "exact":
        if exact_data is None:
            exact_data = _exact_data(cfg)
        return _ExactSource(exact_data)
    tensors = _load_tensors(d.path)
    if "x0" not in tensors:
        raise ConfigError(f"config key data.path: {d.path!r} has no tensor 'x0' (keys: {sorted(tensors)})")
    x0 = tensors["x0"].float()
    want = (d.channels, d.height, d.width)
    if x0.dim() != 4 or tuple(x0.shape[1:]) != want:
        raise ConfigError(f"config key data.path: x0 must have shape (N, {', '.join(map(str, want))}), got {tuple(x0.shape)}")
    labels = tensors.get("class_labels")
    if labels is not None:
        labels = labels.long()
        if labels.shape != (x0.shape[0],):
            raise ConfigError(f"config key data.path: class_labels must have shape ({x0.shape[0]},), got {tuple(labels.shape)}")
    return _TensorSource(x0, labels, cfg.seed)


# ---------------------------------------------------------------------------------------------- logging


class _Logger:
    """stdout + JSONL (+ TensorBoard when installed), rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
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
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict[str, Any], line: str | None = None, bar=None) -> None:
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
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """pi-ID distillation of a policy student from a teacher, as configured by a :class:`TrainConfig`.

    Components are built from the config unless given: ``student`` (an ``nn.Module`` returning a
    policy output), ``teacher`` (``teacher(x_t, timestep, **cond) -> velocity``) and ``data`` (an
    object with ``draw(n, generator, iteration, shard, num_shards) -> (x0, labels)``); ``exact_data``
    (a GaussianMixtureData) enables the distance-to-data metrics of :meth:`evaluate`.

    Methods: :meth:`train`, :meth:`train_step`, :meth:`accumulate_gradients` (forward/backward of one
    global batch, no update), :meth:`evaluate`, :meth:`save_checkpoint`, :meth:`resume`, :meth:`close`.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        data: Any = None,
        exact_data: Any = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.cfg = cfg = config
        self.ctx: DistContext = init_distributed(cfg.distributed, cfg.device)
        self.device = self.ctx.device
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.iteration = 0

        # the global RNGs only serve modules that draw from them (e.g. dropout layers)
        torch.manual_seed(stream_seed(cfg.seed, 0, self.ctx.rank, purpose=1))
        np.random.seed(stream_seed(cfg.seed, 0, self.ctx.rank, purpose=1) % (2**32))

        teacher_model = None
        if teacher is None:
            teacher, teacher_model, built_data = build_teacher(cfg)
            exact_data = exact_data if exact_data is not None else built_data
        self.teacher = teacher.to(self.device) if isinstance(teacher, nn.Module) else teacher
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval().requires_grad_(False)
        self.exact_data = exact_data
        self.data = data if data is not None else build_data_source(cfg, exact_data)
        if cfg.data.mode == "data_dependent" and self.data is None:
            raise ConfigError("data.mode = 'data_dependent' needs a data source")

        if student is None:
            if cfg.student.kind == "diffusers" and teacher_model is None and not cfg.student.init_from:
                raise ValueError("student.kind = 'diffusers' is built from the teacher model: pass student= with teacher=")
            student = build_student(cfg, teacher_model)
        student = student.to(self.device)
        student.train()
        self.ema = EMA(student, cfg.ema.decay, cfg.ema.start_iter, cfg.ema.policy, cfg.ema.gamma)
        self.model = wrap_model(student, self.ctx, cfg.distributed)
        if self.ctx.mode == "fsdp":
            self.ema.module = wrap_model(self.ema.module, self.ctx, cfg.distributed, trainable=False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        o = cfg.optim
        self.optimizer = make_adamw(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: warmup_factor(it, o.warmup_iters, o.warmup_ratio)
        )
        self.use_autocast = self.device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")
        if cfg.mixed_precision == "bf16" and self.device.type != "cuda" and self.ctx.is_main:
            warnings.warn("mixed_precision = 'bf16' applies on CUDA only; training in float32 on the CPU", stacklevel=2)
        self._logger: _Logger | None = None

    # ------------------------------------------------------------------ properties
    @property
    def student(self) -> nn.Module:
        """The trained student, unwrapped from DDP."""
        return unwrap_model(self.model)

    @property
    def num_shards(self) -> int:
        """Micro-batches per optimizer step over all ranks."""
        return self.ctx.world_size * self.cfg.optim.grad_accum

    @property
    def logger(self) -> _Logger:
        if self._logger is None:
            self._logger = _Logger(self.out_dir, self.ctx.is_main, self.cfg.tensorboard)
        return self._logger

    def _autocast(self):
        if self.use_autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one step
    def _micro_batch(
        self, shard: int, iteration: int, seed: int | None = None
    ) -> tuple[torch.Generator, torch.Tensor, dict[str, Any]]:
        """Generator, x0 (data-dependent) or noise (data-free), and conditioning of one micro-batch.

        The generator (CPU) is seeded by ``(cfg.seed, iteration, shard)`` unless ``seed`` is given.
        """
        cfg = self.cfg
        d = cfg.data
        g = _generator(stream_seed(cfg.seed, iteration, shard) if seed is None else seed, "cpu")
        labels = None
        if d.mode == "data_dependent":
            x, labels = self.data.draw(d.batch_size, g, iteration, shard, self.num_shards)
        else:
            x = torch.randn((d.batch_size, d.channels, d.height, d.width), generator=g)
        if d.num_classes > 0 and labels is None:
            labels = torch.randint(0, d.num_classes, (d.batch_size,), generator=g)
        cond = {} if labels is None else {"class_labels": labels.to(self.device)}
        return g, x.to(self.device, torch.float32), cond

    def _num_segments(self) -> int:
        return self.cfg.piid.nfe

    def _data_dependent_backward(self, g, x0, cond, sync: bool, scale: float) -> tuple[float, dict]:
        from piflow_kernels.distill.piid import piid_loss_data_dependent

        with grad_sync(self.model, self.ctx, enabled=sync):
            with self._autocast():
                loss, logs = piid_loss_data_dependent(
                    self.model, self.teacher, x0, self.cfg.piid, iteration=self.iteration, generator=g,
                    student_kwargs=cond, teacher_kwargs=cond,
                )
            (loss * scale).backward()
        return float(loss.detach()), logs

    def _data_free_backward(self, g, noise, cond, sync: bool, scale: float) -> tuple[float, dict]:
        from piflow_kernels.distill.piid import piid_data_free_segments

        segments = iter(
            piid_data_free_segments(
                self.model, self.teacher, noise, self.cfg.piid, iteration=self.iteration, generator=g,
                student_kwargs=cond, teacher_kwargs=cond,
            )
        )
        n = self._num_segments()
        total, logs = 0.0, {}
        for k in range(n):
            # one backward per segment; DDP syncs on the step's very last backward only, and the
            # segment's forward (run by next()) must sit inside the same no_sync block as its backward
            with grad_sync(self.model, self.ctx, enabled=sync and k == n - 1):
                with self._autocast():
                    try:
                        loss, seg_logs = next(segments)
                    except StopIteration:
                        raise RuntimeError(f"piid_data_free_segments yielded {k} segments, expected nfe = {n}") from None
                (loss * scale).backward()
            total += float(loss.detach())
            logs.update({key: v for key, v in seg_logs.items() if key not in ("loss", "segment_size", "step")})
        if next(segments, None) is not None:
            raise RuntimeError(f"piid_data_free_segments yielded more than nfe = {n} segments")
        return total, logs

    def accumulate_gradients(self) -> dict[str, float]:
        """Forward and backward of this rank's micro-batches of one global batch, gradients synced.

        Leaves the gradient of the global-batch mean loss in ``.grad`` (no optimizer step) and
        returns this rank's logs (``loss``: its mean over the rank's micro-batches).
        """
        accum = self.cfg.optim.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        run = self._data_dependent_backward if self.cfg.data.mode == "data_dependent" else self._data_free_backward
        total = 0.0
        logs: dict[str, float] = {}
        for micro in range(accum):
            shard = self.ctx.rank * accum + micro
            g, x, cond = self._micro_batch(shard, self.iteration)
            loss, step_logs = run(g, x, cond, sync=micro == accum - 1, scale=1.0 / accum)
            total += loss
            for key, value in step_logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    logs[key] = logs.get(key, 0.0) + float(value) / accum
        logs["loss"] = total / accum
        return logs

    def train_step(self) -> dict[str, float]:
        """One optimizer step: gradients, clipping, AdamW, LR schedule, EMA. Returns this rank's logs."""
        o = self.cfg.optim
        logs = self.accumulate_gradients()
        clip = o.grad_clip if (o.grad_clip > 0 and self.iteration >= o.grad_clip_begin_iter) else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        logs["grad_norm"] = float(grad_norm)
        logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        logs["ema_decay"] = self.ema.update(self.student, self.iteration)
        self.iteration += 1
        return logs

    # ------------------------------------------------------------------ the loop
    def train(self, max_iters: int | None = None) -> dict[str, float]:
        """Train until ``max_iters`` (default ``cfg.max_iters``) steps are done; returns the last logs.

        Logs every ``log_every`` steps, evaluates every ``eval_every``, checkpoints every
        ``ckpt_every`` and at the end (when the run made progress).
        """
        cfg = self.cfg
        target = cfg.max_iters if max_iters is None else int(max_iters)
        start = self.iteration
        last_logs: dict[str, float] = {}
        if self.ctx.is_main and start < target:
            self.logger.log(
                {"iteration": start, "event": "start", "world_size": self.ctx.world_size, "device": str(self.device)},
                f"pi-ID training: iterations {start} -> {target}, {self.ctx.world_size} process(es) on {self.device}, "
                f"global batch {cfg.data.batch_size * self.num_shards}, mode {cfg.data.mode}",
            )
        bar = None
        if cfg.progress and self.ctx.is_main and start < target:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, initial=start, desc="pi-ID", dynamic_ncols=True, file=sys.stderr)
        window_start, window_iters = time.perf_counter(), 0
        sums: dict[str, float] = {}
        try:
            while self.iteration < target:
                logs = self.train_step()
                window_iters += 1
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + value
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
                done = self.iteration
                if (cfg.log_every and done % cfg.log_every == 0) or done == target:
                    elapsed = time.perf_counter() - window_start
                    record = {key: self.ctx.all_reduce_mean(v / window_iters) for key, v in sorted(sums.items())}
                    record["it_per_s"] = window_iters / max(elapsed, 1e-9)
                    record = {"iteration": done, **record}
                    self.logger.log(record, _format(record, target), bar)
                    last_logs = record
                    window_start, window_iters, sums = time.perf_counter(), 0, {}
                if cfg.eval_every and done % cfg.eval_every == 0:
                    self.evaluate(bar=bar)
                if cfg.ckpt_every and done % cfg.ckpt_every == 0:
                    self.save_checkpoint()
            if self.iteration > start and not (cfg.ckpt_every and self.iteration % cfg.ckpt_every == 0):
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return last_logs

    # ------------------------------------------------------------------ evaluation
    def _sample(self, module: nn.Module, noise: torch.Tensor, nfe: int, cond: dict[str, Any]) -> torch.Tensor:
        """Few-step sampling with ``module`` from ``noise`` (B, C, H, W) by the library's sampler."""
        p = self.cfg.piid
        try:
            from piflow_kernels.sampling import sample
            from piflow_kernels.scheduler import PiFlowScheduler
        except ImportError:  # the diffusers-based sampler is unavailable: roll the policies out directly
            return _rollout_sample(module, noise, nfe, cond, p)
        if p.num_train_timesteps != int(p.num_train_timesteps):  # the scheduler takes an int scale
            return _rollout_sample(module, noise, nfe, cond, p)
        dx = p.dx_policy_kwargs()
        scheduler = PiFlowScheduler(
            num_train_timesteps=int(p.num_train_timesteps),
            shift=p.shift,
            use_dynamic_shifting=p.use_dynamic_shifting,
            base_seq_len=p.base_seq_len,
            max_seq_len=p.max_seq_len,
            base_logshift=p.base_logshift,
            max_logshift=p.max_logshift,
            final_step_size_scale=p.final_step_size_scale,
            total_substeps=p.total_substeps,
            policy_type=p.policy_type,
            dx_segment_size=dx["segment_size"],
            dx_shift=dx["shift"],
            dx_mode=dx["mode"],
            backend=p.backend,
        )
        return sample(module, noise, nfe, scheduler=scheduler, progress=False, **cond)

    @torch.no_grad()
    def evaluate(self, bar=None) -> dict[str, float]:
        """Sample with the EMA student from fixed noise and report statistics (all ranks run it, rank 0 logs).

        Reports ``eval/piid_loss`` (the EMA student's pi-ID loss on a fixed batch with teacher ratio 0),
        sample mean/std and, when the data is an exact Gaussian mixture, ``eval/energy_distance`` and
        ``eval/sliced_w2`` between the samples and as many exact data samples.
        """
        cfg = self.cfg
        e, d = cfg.eval, cfg.data
        module = self.ema.module
        module.eval()
        nfe = e.nfe or cfg.piid.nfe
        g = _generator(e.seed)
        noise = torch.randn((e.num_samples, d.channels, d.height, d.width), generator=g)
        labels = torch.randint(0, d.num_classes, (e.num_samples,), generator=g) if d.num_classes > 0 else None
        chunks = []
        for i in range(0, e.num_samples, e.batch_size):
            cond = {} if labels is None else {"class_labels": labels[i : i + e.batch_size].to(self.device)}
            with self._autocast():
                x = self._sample(module, noise[i : i + e.batch_size].to(self.device), nfe, cond)
            chunks.append(x.float().cpu())
        samples = torch.cat(chunks)
        metrics: dict[str, float] = {
            "eval/sample_mean": float(samples.mean()),
            "eval/sample_std": float(samples.std()),
            "eval/finite": float(torch.isfinite(samples).all()),
            "eval/piid_loss": self.imitation_loss(module),
        }
        if self.exact_data is not None and torch.isfinite(samples).all():
            ref = self.exact_data.sample(e.num_samples, generator=_generator(e.seed + 1))
            metrics["eval/energy_distance"] = energy_distance(samples, ref)
            metrics["eval/sliced_w2"] = sliced_w2(samples, ref, seed=e.seed)
        record = {"iteration": self.iteration, **metrics}
        if self.ctx.is_main:
            self.logger.log(record, _format(record), bar)
        return metrics

    @torch.no_grad()
    def imitation_loss(self, module: nn.Module | None = None, iteration_for_ratio: int | None = None) -> float:
        """pi-ID loss of ``module`` (default: the EMA student) on a fixed batch with fixed draws.

        The teacher ratio is that of ``iteration_for_ratio`` (default: past the decay, ratio 0, the
        imitation of the student's own trajectories). Comparable across iterations and runs.
        """
        from piflow_kernels.distill.piid import piid_data_free_segments, piid_loss_data_dependent

        module = self.ema.module if module is None else module
        cfg = self.cfg
        it = cfg.piid.num_decay_iters if iteration_for_ratio is None else iteration_for_ratio
        shard_seed = stream_seed(cfg.eval.seed, 0, 0, purpose=3)
        g, x, cond = self._micro_batch(0, 0, seed=shard_seed)
        with self._autocast():
            if cfg.data.mode == "data_dependent":
                loss, _ = piid_loss_data_dependent(
                    module, self.teacher, x, cfg.piid, iteration=it, generator=g, student_kwargs=cond, teacher_kwargs=cond
                )
                return float(loss)
            total = 0.0
            for loss, _ in piid_data_free_segments(
                module, self.teacher, x, cfg.piid, iteration=it, generator=g, student_kwargs=cond, teacher_kwargs=cond
            ):
                total += float(loss)
            return total

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current iteration under ``<out_dir>/checkpoints`` (collective: call on every rank)."""
        cfg, ctx = self.cfg, self.ctx
        student_sd = model_state_dict(self.model, ctx)
        ema_sd = model_state_dict(self.ema.module, ctx)
        optim_sd = optimizer_state_dict(self.model, self.optimizer, ctx)
        if ctx.is_main:
            ckpt.begin_checkpoint(self.ckpt_root, self.iteration)
        ctx.barrier()
        ckpt.write_rank_rng(self.ckpt_root, self.iteration, ctx.rank)
        ctx.barrier()
        path = None
        if ctx.is_main:
            state = {
                "optimizer": optim_sd,
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.meta_state(),
                "world_size": ctx.world_size,
                "num_shards": self.num_shards,
                "config": cfg.to_dict(),
            }
            path = ckpt.finish_checkpoint(self.ckpt_root, self.iteration, student_sd, ema_sd, state, cfg.keep_checkpoints)
            self.logger.log({"iteration": self.iteration, "event": "checkpoint", "path": str(path)}, f"saved checkpoint {path}")
        ctx.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the checkpoint at ``path`` (default: the latest under ``<out_dir>/checkpoints``).

        Returns False (and starts fresh) when ``path`` is None and there is none yet.
        """
        if path is None:
            path = ckpt.latest_checkpoint(self.ckpt_root)
            if path is None:
                if self.ctx.is_main:
                    self.logger.log({"iteration": 0, "event": "resume", "found": False}, "no checkpoint to resume: fresh start")
                return False
        loaded = ckpt.load_checkpoint(path, rank=self.ctx.rank)
        load_model_state_dict(self.model, loaded.student, self.ctx)
        load_model_state_dict(self.ema.module, loaded.ema, self.ctx)
        load_optimizer_state_dict(self.model, self.optimizer, loaded.state["optimizer"], self.ctx)
        self.scheduler.load_state_dict(loaded.state["scheduler"])
        self.ema.load_meta_state(loaded.state["ema"])
        if loaded.rng is not None:
            ckpt.set_rng_state(loaded.rng)
        self.iteration = loaded.iteration
        saved_shards = int(loaded.state.get("num_shards", self.num_shards))
        if self.ctx.is_main:
            if saved_shards != self.num_shards:
                warnings.warn(
                    f"resuming with {self.num_shards} micro-batches per step (world size x grad_accum) instead of "
                    f"{saved_shards}: the data stream differs from the interrupted run's",
                    stacklevel=2,
                )
            self.logger.log(
                {"iteration": self.iteration, "event": "resume", "path": str(loaded.path)},
                f"resumed from {loaded.path} at iteration {self.iteration}",
            )
        return True

    def close(self) -> None:
        """Close the logs and the process group this trainer created."""
        if self._logger is not None:
            self._logger.close()
        self.ctx.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format(record: dict[str, Any], target: int | None = None) -> str:
    it = record["iteration"]
    head = f"it {it}" + (f"/{target}" if target else "")
    parts = [head]
    for key, value in record.items():
        if key == "iteration" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key == "it_per_s":
            parts.append(f"{value:.2f} it/s")
        elif key == "lr":
            parts.append(f"lr {value:.2e}")
        else:
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)


def _rollout_sample(module: nn.Module, noise: torch.Tensor, nfe: int, cond: dict[str, Any], p) -> torch.Tensor:
    """Deterministic few-step sampling (h = 0) without the scheduler: build each policy, roll it out."""
    from piflow_kernels.distill.piid import student_policy
    from piflow_kernels.timesteps import warp

    f = p.final_step_size_scale
    shift = p.shift_for(math.prod(noise.shape[2:]))
    raw = [max(1.0 - i / (nfe - 1 + f), 0.0) for i in range(nfe)] + [0.0]
    sigmas = [min(warp(r, shift), 1.0) for r in raw]
    x = noise
    b = noise.shape[0]
    for i in range(nfe):
        s = torch.full((b,), sigmas[i], device=noise.device)
        out = module(x, s * p.num_train_timesteps, **cond)
        policy = student_policy(out, x, s, p)
        x = policy.rollout(x, s, torch.full((b,), sigmas[i + 1], device=noise.device), p.total_substeps, shift)
    return x
