"""The pi-ID trainer: one process or torchrun DDP / FSDP2, deterministic and resumable bit-exactly.

    >>> cfg = TrainConfig.from_file("examples/distill_exact_teacher.toml")
    >>> trainer = Trainer(cfg)
    >>> trainer.train()                     # logs to stdout, <out_dir>/log.jsonl, TensorBoard
    >>> trainer = Trainer(cfg); trainer.resume(); trainer.train()   # continues where it stopped

The trainer composes small components, each owning one concern: the models (:mod:`.builders`), the
x0 stream (:mod:`.data`), seeds (:mod:`.seeding`), AdamW (:mod:`.optim`) and its schedule
(:mod:`.lr_scheduler`), the EMA (:mod:`.ema`), process groups and wrapping (:mod:`.ddp`), the log
(:mod:`.run_log`), checkpoints (:mod:`.checkpoint`) and sampling for evaluation (:mod:`.evaluation`).

Determinism. Every optimizer step ``it`` consumes ``world_size * grad_accum`` micro-batches. Micro-batch
``j`` of rank ``r`` is shard ``r * grad_accum + j`` of the global batch and draws everything (data,
noise, class labels, the loss's random times and dropout) from its own generator seeded by
``(seed, it, shard)``. No RNG state is carried from one step to the next, so a resumed run draws
exactly what an uninterrupted one would, and a run on N ranks sees the same global batch as one
process with ``grad_accum * N`` micro-batches (DDP averages gradients over ranks, accumulation
divides each micro-batch's loss by ``grad_accum``).

Host syncs. A training step reads nothing back from the device: losses and the gradient norm stay
0-d tensors in the step's logs, and :class:`~.run_log.MetricsWindow` brings a window of them to the
host in one transfer every ``log_every`` steps, at every checkpoint and at the end.

Non-finite steps are skipped on the device and counted there (:mod:`.guards`); ``optim.max_nonfinite_steps``
in a row stop the run with :class:`NonFiniteError`, and no checkpoint is written with non-finite weights. Start-up
checks (:mod:`.startup`), before any model is built: ``device``, an explicit ``piid.backend``, the notice before a
long ``torch.compile``; :meth:`resume` refuses a checkpoint whose saved config differs in keys that change the run
unless ``allow_config_change`` (``--force-resume``) is set.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from piflow_kernels.distill import checkpoint as ckpt
from piflow_kernels.distill.builders import (
    NEGATIVE_PREFIX,
    build_teacher,
    build_training_student,
    embedded_guidance,
    tied_teacher,
)
from piflow_kernels.distill.config import ConfigError, TrainConfig
from piflow_kernels.distill.data import DataSource, LatentDataSource, build_data_source, build_prompt_source
from piflow_kernels.distill.ddp import DistContext, grad_sync, init_distributed, unwrap_model, wrap_model
from piflow_kernels.distill.ema import EMA
from piflow_kernels.distill.evaluation import sample_metrics, sample_with
from piflow_kernels.distill.guards import (
    NonFiniteError,
    StepHealth,
    named_weights,
    nonfinite_weight_flags,
    nonfinite_weights_listing,
)
from piflow_kernels.distill.lr_scheduler import build_lr_scheduler
from piflow_kernels.distill.optim import make_optimizer, step_where
from piflow_kernels.distill.piid import piid_data_free_segments, piid_loss_data_dependent
from piflow_kernels.distill.run_log import MetricsWindow, ProgressBar, RunLog, format_record
from piflow_kernels.distill.seeding import PURPOSE_EVAL_BATCH, seed_global_rngs, seeded_generator, stream_seed
from piflow_kernels.distill.startup import (
    check_backend,
    check_device,
    check_resumed_config,
    check_token_size,
    device_type,
    rollout_compile_pending,
)

__all__ = ["Trainer", "NonFiniteError", "check_device", "check_backend", "rollout_compile_pending"]

Logs = dict[str, torch.Tensor | float]


# notices printed once per process (the substep compiles once per process)
_NOTICED: set[str] = set()


class Trainer:
    """pi-ID distillation of a policy student from a teacher, as configured by a :class:`TrainConfig`.

    Components are built from the config unless given: ``student`` (an ``nn.Module`` returning a
    policy output), ``teacher`` (``teacher(x_t, timestep, **cond) -> velocity``) and ``data`` (a
    :class:`~.data.DataSource`, e.g. :class:`~.data.ExactDataSource` over an in-memory mixture);
    ``exact_data`` (a GaussianMixtureData) enables the distance-to-data metrics of :meth:`evaluate`.

    Methods: :meth:`train`, :meth:`train_step`, :meth:`accumulate_gradients` (forward/backward of one
    global batch, no update), :meth:`evaluate`, :meth:`save_checkpoint`, :meth:`resume`, :meth:`close`.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        data: DataSource | None = None,
        exact_data: Any = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.cfg = cfg = config
        # before any process group, model or data: a device or backend that cannot run fails here, by its key
        check_device(cfg.device)
        check_backend(cfg, device_type(cfg.device))
        self.ctx: DistContext = init_distributed(cfg.distributed, cfg.device)
        self.device = self.ctx.device
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.iteration = 0
        self._run_log: RunLog | None = None
        seed_global_rngs(cfg.seed, self.ctx.rank)

        teacher_model = None
        # a tied teacher (a LoRA student's own base) is the student run with as_teacher=True, set up below
        tie = teacher is None and student is None and cfg.student.lora_rank > 0 and cfg.student.tie_teacher
        if teacher is None:
            teacher, teacher_model, built_data = build_teacher(cfg)
            exact_data = exact_data if exact_data is not None else built_data
            if tie:
                teacher = None  # its model becomes the student's trunk
        if teacher is not None:
            self.teacher = teacher.to(self.device) if isinstance(teacher, nn.Module) else teacher
            if isinstance(self.teacher, nn.Module):
                self.teacher.eval().requires_grad_(False)
        self.exact_data = exact_data
        self.data = data if data is not None else build_data_source(cfg, exact_data)
        if cfg.data.mode == "data_dependent" and self.data is None:
            raise ConfigError("data.mode = 'data_dependent' needs a data source")
        # text conditioning from the prompt cache, and a guidance-distilled teacher's guidance input
        self.prompts = build_prompt_source(cfg, type(teacher_model).__name__) if teacher_model is not None else None
        if cfg.data.prompt_cache and self.prompts is None:
            raise ConfigError("config key data.prompt_cache needs the teacher built from [teacher] (teacher= was given)")
        if self.prompts is not None and cfg.data.mode == "data_dependent" and cfg.data.source != "latents":
            raise ConfigError(
                "config key data.prompt_cache with data.mode = 'data_dependent' needs image latents paired with the "
                "prompts (data.source = 'latents', a latent cache from encode-images), or data.mode = 'data_free'"
            )
        self._paired = isinstance(self.data, LatentDataSource) and self.prompts is not None
        self.guidance = embedded_guidance(cfg, teacher_model) if teacher_model is not None else None
        check_token_size(cfg, teacher_model)
        self._cond_dtype = getattr(torch, cfg.teacher.dtype)
        self._teacher_class = type(teacher_model).__name__
        self._text_eval: Any = None
        self._warned_labels = False

        if student is None:
            if cfg.student.kind == "diffusers" and teacher_model is None and not cfg.student.init_from:
                raise ValueError("student.kind = 'diffusers' is built from the teacher model: pass student= with teacher=")
            student = build_training_student(cfg, teacher_model)
        student = student.to(self.device)
        student.train()
        self.ema = EMA(student, cfg.ema.decay, cfg.ema.start_iter, cfg.ema.policy, cfg.ema.gamma)
        self.model = wrap_model(student, self.ctx, cfg.distributed)
        if self.ctx.mode == "fsdp":
            self.ema.module = wrap_model(self.ema.module, self.ctx, cfg.distributed, trainable=False)
        if tie:
            self.teacher = tied_teacher(cfg, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        # a student with frozen parameters (LoRA) checkpoints only what it trains
        trained = {name for name, p in self.student.named_parameters() if p.requires_grad}
        self.trained_keys = trained if len(trained) < len(list(self.student.parameters())) else None
        o = cfg.optim
        self.optimizer, reason = make_optimizer(
            self.params, o.optimizer, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        if reason and self.ctx.is_main:
            self.run_log.log({"iteration": 0, "event": "optimizer", "reason": reason}, reason)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, o, cfg.max_iters)
        self.use_autocast = self.device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")
        self._autocast_dtype = torch.bfloat16
        if not self.use_autocast and cfg.teacher.dtype != "float32" and cfg.mixed_precision != "no":
            # weights held in bf16 / fp16 with float32 trained parameters and inputs: autocast on any device
            self.use_autocast, self._autocast_dtype = True, getattr(torch, cfg.teacher.dtype)
        if cfg.mixed_precision == "bf16" and self.device.type != "cuda" and self.ctx.is_main:
            warnings.warn("mixed_precision = 'bf16' applies on CUDA only; training in float32 on the CPU", stacklevel=2)
        # skipped (non-finite) steps, counted on the device: the current run of them, the longest run and the
        # total; the host reads them with the log window only (see the module docstring)
        self.health = StepHealth(self.device, cfg.optim.max_nonfinite_steps, self.ctx.is_main)

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
    def run_log(self) -> RunLog:
        """The run's log (stdout, log.jsonl, TensorBoard), opened on first use."""
        if self._run_log is None:
            self._run_log = RunLog(self.out_dir, self.ctx.is_main, self.cfg.tensorboard)
        return self._run_log

    def _autocast(self):
        if self.use_autocast:
            return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one step
    def _micro_batch(
        self, shard: int, iteration: int, seed: int | None = None
    ) -> tuple[torch.Generator, torch.Tensor, dict[str, Any]]:
        """Generator, x0 (data-dependent) or noise (data-free) (B, C, H, W) (video: (B, C, frames, H, W)), and
        conditioning of one micro-batch.

        The generator (CPU) is seeded by ``(cfg.seed, iteration, shard)`` unless ``seed`` is given.
        """
        d = self.cfg.data
        g = seeded_generator(stream_seed(self.cfg.seed, iteration, shard) if seed is None else seed)
        labels = None
        if d.mode == "data_dependent":
            x, labels = self.data.draw(d.batch_size, g, iteration, shard, self.num_shards)
        else:
            x = torch.randn((d.batch_size, *_latent_shape(d)), generator=g)
        if labels is not None and d.num_classes == 0:
            if not self._warned_labels and self.ctx.is_main:
                warnings.warn("the data holds class_labels but data.num_classes = 0: the labels are not used", stacklevel=2)
            self._warned_labels = True
            labels = None
        if d.num_classes > 0 and labels is None:
            labels = torch.randint(0, d.num_classes, (d.batch_size,), generator=g)
        # non_blocking: the CPU batch is staged by the copy, the host does not wait for the device
        cond = {} if labels is None else {"class_labels": labels.to(self.device, non_blocking=True)}
        if self.prompts is not None:
            # beside image latents, the prompts are those images' captions (the caches are aligned by index)
            paired = self.data.indices(d.batch_size, iteration, shard, self.num_shards) if self._paired else None
            cond.update(self._device_cond(self.prompts.draw(d.batch_size, iteration, shard, self.num_shards, paired)))
        if self.guidance is not None:
            cond["guidance"] = torch.full((d.batch_size,), self.guidance, device=self.device)
        return g, x.to(self.device, torch.float32, non_blocking=True), cond

    def _device_cond(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cached conditioning on the device, floating tensors in the teacher's weight dtype."""
        return {
            k: v.to(self.device, self._cond_dtype if v.is_floating_point() else None, non_blocking=True)
            for k, v in tensors.items()
        }

    @staticmethod
    def _student_cond(cond: Mapping[str, Any]) -> dict[str, Any]:
        """The student's conditioning: the teacher's without the negative prompt (the CFG branch the student lacks)."""
        return {k: v for k, v in cond.items() if not k.startswith(NEGATIVE_PREFIX)}

    def _data_dependent_backward(self, g, x0, cond, sync: bool, scale: float) -> tuple[torch.Tensor, Logs]:
        """One micro-batch's loss and backward; returns (its detached float64 loss, its logs)."""
        with grad_sync(self.model, self.ctx, enabled=sync):
            with self._autocast():
                loss, logs = piid_loss_data_dependent(
                    self.model, self.teacher, x0, self.cfg.piid, iteration=self.iteration, generator=g,
                    student_kwargs=self._student_cond(cond), teacher_kwargs=cond,
                )  # fmt: skip
            (loss * scale).backward()
        return loss.detach().double(), logs

    def _data_free_backward(self, g, noise, cond, sync: bool, scale: float) -> tuple[torch.Tensor, Logs]:
        """All nfe segments of one micro-batch, one backward each; returns (the sum of their detached losses, logs)."""
        segments = iter(
            piid_data_free_segments(
                self.model, self.teacher, noise, self.cfg.piid, iteration=self.iteration, generator=g,
                student_kwargs=self._student_cond(cond), teacher_kwargs=cond,
            )
        )  # fmt: skip
        n = self.cfg.piid.nfe
        total, logs = torch.zeros((), dtype=torch.float64, device=self.device), {}
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
            total = total + loss.detach().double()
            logs.update({key: v for key, v in seg_logs.items() if key not in ("loss", "segment_size", "step")})
        if next(segments, None) is not None:
            raise RuntimeError(f"piid_data_free_segments yielded more than nfe = {n} segments")
        return total, logs

    def accumulate_gradients(self) -> Logs:
        """Forward and backward of this rank's micro-batches of one global batch, gradients synced.

        Leaves the gradient of the global-batch mean loss in ``.grad`` (no optimizer step) and
        returns this rank's logs: ``loss`` (its mean over the rank's micro-batches) and the other
        losses as 0-d float64 tensors (never read back here), settings such as ``teacher_ratio`` as floats.
        """
        accum = self.cfg.optim.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        run = self._data_dependent_backward if self.cfg.data.mode == "data_dependent" else self._data_free_backward
        total: torch.Tensor | float = 0.0
        logs: Logs = {}
        for micro in range(accum):
            g, x, cond = self._micro_batch(self.ctx.rank * accum + micro, self.iteration)
            loss, step_logs = run(g, x, cond, sync=micro == accum - 1, scale=1.0 / accum)
            total = total + loss
            for key, value in step_logs.items():
                if isinstance(value, torch.Tensor):
                    value = value.double()  # float64 sums, as Python floats would add them
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                logs[key] = logs.get(key, 0.0) + value / accum
        logs["loss"] = total / accum
        return logs

    def train_step(self) -> Logs:
        """One optimizer step: gradients, clipping, AdamW, LR schedule, EMA. Returns this rank's logs
        (``grad_norm`` a 0-d tensor, ``lr`` and ``ema_decay`` floats; see :meth:`accumulate_gradients`)."""
        o = self.cfg.optim
        logs = self.accumulate_gradients()
        clip = o.grad_clip if (o.grad_clip > 0 and self.iteration >= o.grad_clip_begin_iter) else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        logs["grad_norm"] = grad_norm.detach()
        logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        # a non-finite step changes nothing but the counters, decided on the device (module docstring)
        ok = self._on_every_rank(torch.isfinite(logs["loss"]) & torch.isfinite(logs["grad_norm"]))
        ok = step_where(self.optimizer, ok)
        self.lr_scheduler.step()
        logs["ema_decay"] = self.ema.update(self.student, self.iteration, ok=ok)
        self.health.count(ok)
        self.iteration += 1
        return logs

    def _on_every_rank(self, ok: torch.Tensor) -> torch.Tensor:
        """``ok`` and-ed over ranks (one 0-d all-reduce, no host read), so that every replica skips the same steps:
        the gradient norm is global, but a loss may be non-finite on one rank only."""
        if self.ctx.world_size > 1 and dist.is_available() and dist.is_initialized():
            bad = (~ok).to(torch.float32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            ok = bad == 0
        return ok

    # ------------------------------------------------------------------ the loop
    def train(self, max_iters: int | None = None) -> dict[str, float]:
        """Train until ``max_iters`` (default ``cfg.max_iters``) steps are done; returns the last log record.

        Logs every ``log_every`` steps, at every checkpoint and at the end, evaluates every ``eval_every``,
        checkpoints every ``ckpt_every`` and, with ``final_checkpoint``, at the end (when the run made progress).
        Each log line checks the skipped-step counters, each checkpoint the weights too: :class:`NonFiniteError`
        stops the run there, after logging and before saving.
        """
        cfg = self.cfg
        target = cfg.max_iters if max_iters is None else int(max_iters)
        start = self.iteration
        if start >= target:
            return {}
        self._log_start(start, target)
        window, record = MetricsWindow(), {}
        with ProgressBar(self.cfg.progress and self.ctx.is_main, target, start, self.cfg.name) as bar:
            while self.iteration < target:
                window.add(self.train_step())
                done = self.iteration
                bar.update(1)
                save = _every(cfg.ckpt_every, done) or (done == target and cfg.final_checkpoint)
                if _every(cfg.log_every, done) or done == target or save:
                    record = self._log_window(window, done, target, bar, weights=save)
                if _every(cfg.eval_every, done):
                    self.evaluate(bar=bar.tqdm)
                if save:
                    self._write_checkpoint()  # checked by the _log_window above
        return record

    def _log_window(self, window: MetricsWindow, done: int, target: int, bar: ProgressBar, weights: bool) -> dict[str, Any]:
        """Log the window and check the skipped-step counters (and, before a checkpoint, the weights) read in
        the same transfer, the window's one host read; raises :class:`NonFiniteError` after logging."""
        record = window.reduce(self.ctx, done, latest=self._health_tensors(weights))
        health = {key: record.pop(key) for key in list(record) if key.startswith("nonfinite_")}
        skipped = self.health.skipped_since_check(health, done)
        if skipped:
            record["skipped_steps"] = skipped
        self.run_log.log(record, format_record(record, target), bar.tqdm)
        bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        self._check_health(health, done)
        return record

    def _log_start(self, start: int, target: int) -> None:
        if self.ctx.is_main:
            self.run_log.log(
                {"iteration": start, "event": "start", "world_size": self.ctx.world_size, "device": str(self.device)},
                f"{self.cfg.name} training: iterations {start} -> {target}, {self.ctx.world_size} process(es) on "
                f"{self.device}, global batch {self.cfg.data.batch_size * self.num_shards}, mode {self.cfg.data.mode}",
            )
        self._notice_compile(start)

    def _notice_compile(self, iteration: int) -> None:
        """One line, once per process, before the first step that compiles the GM rollout substep (20-30 s on a CPU)."""
        if not self.ctx.is_main or "compile" in _NOTICED or not rollout_compile_pending(self.cfg, self.device):
            return
        _NOTICED.add("compile")
        where = "the native CPU loop is unavailable, " if self.device.type == "cpu" else ""
        self.run_log.log(
            {"iteration": iteration, "event": "compile", "what": "gm_rollout substep"},
            f"compiling the GM rollout substep with torch.compile ({where}first call: about 20-30 s on a CPU; "
            "PIFLOW_COMPILE=0 runs it eagerly instead)",
        )

    # ------------------------------------------------------------------ non-finite steps and weights
    def _weights(self) -> list[tuple[str, torch.Tensor]]:
        return named_weights({"student": self.student, "ema": self.ema.module})

    def _health_tensors(self, weights: bool) -> dict[str, torch.Tensor]:
        """The skipped-step counters and, with ``weights``, how many weight tensors are not finite (0-d, on the device)."""
        return self.health.tensors(nonfinite_weight_flags(self._weights())[1] if weights else None)

    def _check_health(self, health: Mapping[str, float], done: int) -> None:
        self.health.check(health, done, lambda: nonfinite_weights_listing(self._weights()))

    def _read_health(self) -> dict[str, float]:
        """:meth:`_health_tensors` with the weights, read on the host (outside the loop: one transfer)."""
        tensors = self._health_tensors(weights=True)
        values = torch.stack([t.to(torch.float64) for t in tensors.values()]).tolist()
        return {key: self.ctx.all_reduce_mean(v) for key, v in zip(tensors, values)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, bar: Any = None) -> dict[str, float]:
        """Sample with the EMA student from fixed noise and report statistics (all ranks run it, rank 0 logs).

        Reports ``eval/piid_loss`` (the EMA student's pi-ID loss on a fixed batch with teacher ratio 0),
        sample mean/std and, when the data is an exact Gaussian mixture, ``eval/energy_distance`` and
        ``eval/sliced_w2`` between the samples and as many exact data samples.
        """
        e, d = self.cfg.eval, self.cfg.data
        self._notice_compile(self.iteration)
        module = self.ema.module
        module.eval()
        if self.prompts is not None:
            return self._evaluate_text(module, bar)
        g = seeded_generator(e.seed)
        noise = torch.randn((e.num_samples, *_latent_shape(d)), generator=g)
        labels = torch.randint(0, d.num_classes, (e.num_samples,), generator=g) if d.num_classes > 0 else None
        chunks = []
        for i in range(0, e.num_samples, e.batch_size):
            cond = {} if labels is None else {"class_labels": labels[i : i + e.batch_size].to(self.device)}
            with self._autocast():
                x = sample_with(module, noise[i : i + e.batch_size].to(self.device), self.cfg.piid, nfe=e.nfe or None, **cond)
            chunks.append(x.float().cpu())
        samples = torch.cat(chunks)
        metrics: dict[str, float] = {
            "eval/sample_mean": float(samples.mean()),
            "eval/sample_std": float(samples.std()),
            "eval/finite": float(torch.isfinite(samples).all()),
            "eval/piid_loss": self.imitation_loss(module),
        }
        if self.exact_data is not None and torch.isfinite(samples).all():
            ref = self.exact_data.sample(e.num_samples, generator=seeded_generator(e.seed + 1))
            metrics.update({f"eval/{key}": v for key, v in sample_metrics(samples, ref, seed=e.seed).items()})
        record = {"iteration": self.iteration, **metrics}
        if self.ctx.is_main:
            self.run_log.log(record, format_record(record), bar)
        return metrics

    def _evaluate_text(self, module: nn.Module, bar: Any) -> dict[str, float]:
        from piflow_kernels.distill.text_eval import TextEvaluation

        if self._text_eval is None:
            extra = {"guidance": self.guidance} if self.guidance is not None else None
            self._text_eval = TextEvaluation(self.cfg, self.prompts, self._teacher_class, self.device, self._device_cond, extra)
        metrics = self._text_eval.run(module, self.teacher, self.iteration, self.ctx.is_main, self._autocast)
        metrics["eval/piid_loss"] = self.imitation_loss(module)
        record = {"iteration": self.iteration, **metrics}
        if self.ctx.is_main:
            self.run_log.log(record, format_record(record), bar)
        return metrics

    @torch.no_grad()
    def imitation_loss(self, module: nn.Module | None = None, iteration_for_ratio: int | None = None) -> float:
        """pi-ID loss of ``module`` (default: the EMA student) on a fixed batch with fixed draws.

        The teacher ratio is that of ``iteration_for_ratio`` (default: past the decay, ratio 0, the
        imitation of the student's own trajectories). Comparable across iterations and runs.
        """
        module = self.ema.module if module is None else module
        cfg = self.cfg
        it = cfg.piid.num_decay_iters if iteration_for_ratio is None else iteration_for_ratio
        g, x, cond = self._micro_batch(0, 0, seed=stream_seed(cfg.eval.seed, 0, 0, purpose=PURPOSE_EVAL_BATCH))
        kwargs = {"iteration": it, "generator": g, "student_kwargs": self._student_cond(cond), "teacher_kwargs": cond}
        with self._autocast():
            if cfg.data.mode == "data_dependent":
                return float(piid_loss_data_dependent(module, self.teacher, x, cfg.piid, **kwargs)[0])
            total = 0.0
            for loss, _ in piid_data_free_segments(module, self.teacher, x, cfg.piid, **kwargs):
                total += float(loss)
            return total

    # ------------------------------------------------------------------ checkpoints
    def _training_state(self) -> ckpt.TrainingState:
        return ckpt.TrainingState(
            self.model, self.ema, self.optimizer, self.lr_scheduler, self.cfg.to_dict(), self.num_shards, self.trained_keys
        )

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current iteration under ``<out_dir>/checkpoints`` (collective: call on every rank).

        Raises :class:`NonFiniteError`, writing nothing, when a student or EMA weight is inf or NaN, or when
        ``optim.max_nonfinite_steps`` steps in a row have been skipped.
        """
        health = self._read_health()
        self.health.skipped_since_check(health, self.iteration)
        self._check_health(health, self.iteration)
        return self._write_checkpoint()

    def _write_checkpoint(self) -> Path | None:
        state, keep = self._training_state(), self.cfg.keep_checkpoints
        path = ckpt.save_training_checkpoint(self.ckpt_root, self.iteration, state, self.ctx, keep)
        if self.ctx.is_main:
            self.run_log.log({"iteration": self.iteration, "event": "checkpoint", "path": str(path)}, f"saved checkpoint {path}")
        if self.cfg.save_student:
            self.save_student()
        return path

    def save_student(self, folder: str | Path | None = None) -> Path | None:
        """Write the EMA student as a ``PiFlowStudent.save_pretrained`` folder recording ``[piid]``'s sampling settings
        (default ``<out_dir>/students/iter_<N:08d>``, the newest ``keep_checkpoints`` kept); LoRA merged. Collective
        (every rank calls it; rank 0 writes and returns the folder). Toy students have no such folder: None."""
        from piflow_kernels.distill.ddp import model_state_dict
        from piflow_kernels.distill.student_folder import prune_student_folders, write_student_folder
        from piflow_kernels.students import PiFlowStudent

        module = unwrap_model(self.ema.module)
        if not isinstance(module, PiFlowStudent):
            return None
        state = model_state_dict(self.ema.module, self.ctx)
        if not self.ctx.is_main:
            return None
        root = self.out_dir / "students"
        target = Path(folder) if folder is not None else ckpt.checkpoint_dir(root, self.iteration)
        p = self.cfg.piid
        written = write_student_folder(module, state, target, p.sampling_settings(), num_inference_steps=p.nfe)
        if folder is None:
            prune_student_folders(root, self.cfg.keep_checkpoints)
        self.run_log.log(
            {"iteration": self.iteration, "event": "student", "path": str(written)}, f"saved the EMA student to {written}"
        )
        return written

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the checkpoint at ``path`` (default: the latest under ``<out_dir>/checkpoints``).

        Returns False (and starts fresh) when ``path`` is None and there is none yet.
        """
        if path is None:
            path = ckpt.latest_checkpoint(self.ckpt_root)
            if path is None:
                if self.ctx.is_main:
                    self.run_log.log({"iteration": 0, "event": "resume", "found": False}, "no checkpoint to resume: fresh start")
                return False
        loaded = ckpt.load_training_checkpoint(path, self._training_state(), self.ctx)
        self.iteration = loaded.iteration
        self.health.checked_at = self.iteration
        saved_shards = int(loaded.state.get("num_shards", self.num_shards))
        self._check_resumed_config(loaded.state.get("config"), loaded.path, saved_shards)
        self._warn_nonfinite_weights(loaded.path)
        if self.ctx.is_main:
            if saved_shards != self.num_shards:
                warnings.warn(
                    f"resuming with {self.num_shards} micro-batches per step (world size x grad_accum) instead of "
                    f"{saved_shards}: the data stream differs from the interrupted run's",
                    stacklevel=2,
                )
            self.run_log.log(
                {"iteration": self.iteration, "event": "resume", "path": str(loaded.path)},
                f"resumed from {loaded.path} at iteration {self.iteration}",
            )
        return True

    def _check_resumed_config(self, saved: Any, path: Path, saved_shards: int) -> None:
        changes = check_resumed_config(saved, self.cfg, path, saved_shards, self.num_shards)
        if changes and self.ctx.is_main:
            listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
            warnings.warn(f"resuming {path} with config changes (allow_config_change): {listing}", stacklevel=3)
            self.run_log.log(
                {"iteration": self.iteration, "event": "config_change", "keys": [key for key, _, _ in changes]},
                f"resuming with config changes: {listing}",
            )

    def _warn_nonfinite_weights(self, path: Path) -> None:
        """A resumed checkpoint holding inf or NaN weights gets one warning (one host read, at resume)."""
        if self.ctx.is_main and bool(nonfinite_weight_flags(self._weights())[1].any()):
            warnings.warn(
                f"{path} is damaged: {nonfinite_weights_listing(self._weights())}. Steps with a non-finite loss are skipped "
                "and no checkpoint will be saved from these weights",
                RuntimeWarning,
                stacklevel=3,
            )

    def close(self) -> None:
        """Close the logs and the process group this trainer created."""
        if self._run_log is not None:
            self._run_log.close()
        self.ctx.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _every(period: int, iteration: int) -> bool:
    """Whether ``iteration`` is a multiple of ``period`` (a period of 0 never is)."""
    return bool(period) and iteration % period == 0


def _latent_shape(d: Any) -> tuple[int, ...]:
    """One sample's latent shape from ``[data]``: (C, H, W), or (C, frames, H, W) for video (``frames`` > 0)."""
    return (d.channels, d.frames, d.height, d.width) if d.frames > 0 else (d.channels, d.height, d.width)
