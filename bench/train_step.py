"""One pi-ID training iteration at ImageNet DiT-XL/2 size: where the time and the memory go.

    PYTHONPATH=. python -m bench.train_step --out OUT                        # CUDA, after bench.gpu_check
    PYTHONPATH=. python -m bench.train_step --tiny --device cpu --out /tmp/t   # CPU dry run, seconds

The library's own trainer (``piflow_kernels.distill.Trainer``) is built from a config: a random
``DiTTransformer2DModel`` teacher of the DiT-XL/2 shape (28 layers, 16 heads x 72, patch 2, 4 x 32 x 32
latents, 1000 classes), a GMFlow student from it (``build_student``, K = 32), data-dependent pi-ID with
B = 32 per GPU, 2 intermediate states, 128 substeps per unit raw time, bf16 autocast, AdamW, EMA. Each
timed iteration is ``trainer.train_step()``, unchanged; the script only wraps, from outside, the pieces
it times (nothing in the library is edited):

    teacher forward          the trainer's teacher callable (a wrapper module around it)
    student forward          forward pre-/post-hooks on the student module
    policy rollout           ``GMFlowPolicy.rollout`` (the detached policy walking to each state), patched
    policy velocity fwd/bwd  ``GMFlowPolicy.velocity`` (the live policy at each state), patched; its backward
                             is bracketed by identity autograd nodes on its output and its inputs
    student backward         ``torch.autograd.backward`` minus the policy velocity's backward
    optimizer                from the end of ``accumulate_gradients`` to the end of the step: gradient
                             clipping, AdamW, LR schedule, EMA update
    other                    the rest: data and noise draws, the loss arithmetic, zero_grad

Variants: ``library`` (the library's policies: Triton on CUDA, the CPU path otherwise) and
``official_style`` (rollout and velocity replaced by the official-style eager code of
``bench/official_style.py``, autograd through its eager posterior). Both replay the same iterations
(same seeds: same data, noise, labels and draws). Peak memory: CUDA's max allocated during one
iteration, absolute and above what was allocated before it (models, optimizer state, EMA).

Target (judged on CUDA only): rollouts < 5% of the iteration. Writes ``OUT/train_step.json``.
Needs diffusers (install its wheel on the GPU image).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from bench import official_style
from bench.step_timing import (
    BackwardMark,
    Clock,
    Spans,
    add_threads_flag,
    machine,
    median_index,
    parse_step_args,
    pick_variants,
    step_main,
    step_parser,
    target,
    targets_lines,
)

#: DiT-XL/2 at ImageNet 256 (latents 4 x 32 x 32), as diffusers' DiTTransformer2DModel takes it
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, num_layers=28, sample_size=32, patch_size=2,
                num_embeds_ada_norm=1000)  # fmt: skip
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1, sample_size=8, patch_size=2,
                num_embeds_ada_norm=10)  # fmt: skip
FULL = dict(batch_size=32, num_components=32, total_substeps=128, num_classes=1000, logstd_inner_dim=1024)
TINY = dict(batch_size=4, num_components=4, total_substeps=16, num_classes=10, logstd_inner_dim=64)
VARIANTS = ("library", "official_style")
PHASES = ("teacher_forward_ms", "student_forward_ms", "student_backward_ms", "policy_rollout_ms",
          "policy_velocity_forward_ms", "policy_velocity_backward_ms", "optimizer_ms", "other_ms")  # fmt: skip


def train_config(args: argparse.Namespace, device: str, out_dir: str) -> Any:
    from piflow_kernels.distill import TrainConfig

    model = dict(TINY_DIT if args.tiny else DIT_XL_2)
    size = dict(TINY if args.tiny else FULL)
    if args.batch_size:
        size["batch_size"] = args.batch_size
    if args.num_components:
        size["num_components"] = args.num_components
    if args.total_substeps:
        size["total_substeps"] = args.total_substeps
    res = model["sample_size"]
    return TrainConfig.from_dict(dict(
        name="bench-train-step", seed=0, max_iters=1000, out_dir=out_dir, device=device, mixed_precision=args.mixed_precision,
        log_every=0, eval_every=0, ckpt_every=0, final_checkpoint=False, progress=False, tensorboard=False,
        teacher=dict(kind="diffusers", model_class="DiTTransformer2DModel", seed=1, model=model,
                     guidance_scale=args.guidance_scale, guidance_interval=[0, 600] if args.guidance_scale != 1.0 else []),
        student=dict(kind="diffusers", num_components=size["num_components"],
                     kwargs=dict(logstd_inner_dim=size["logstd_inner_dim"])),
        data=dict(mode=args.mode, source="exact", batch_size=size["batch_size"], channels=model["in_channels"], height=res,
                  width=res, num_classes=size["num_classes"]),
        optim=dict(lr=1e-4, grad_clip=10.0),
        ema=dict(decay=0.9999),
        piid=dict(nfe=args.nfe, policy_type="GMFlow", total_substeps=size["total_substeps"], num_intermediate_states=2,
                  window_substeps=args.window_substeps, gm_dropout=args.gm_dropout),
        distributed=dict(mode="none"),
    ))  # fmt: skip


# ---------------------------------------------------------------------------------------------- probes


class _TimedTeacher(nn.Module):
    """The teacher callable inside a timed span; in eval mode, so pi-ID's eval-mode guard never toggles it."""

    def __init__(self, inner: Any, spans: Spans) -> None:
        super().__init__()
        self.inner = inner
        self.spans = spans
        self.training = False  # not .eval(): that would also walk into the wrapped teacher

    def forward(self, *args, **kwargs):
        with self.spans.span("teacher_forward"):
            return self.inner(*args, **kwargs)


def _official_policy(pol: Any) -> official_style.OfficialStyleGMPolicy:
    return official_style.OfficialStyleGMPolicy(pol.means.float(), pol.logweights.float(), pol.logstds.float(),
                                                pol.x_src.float(), pol.sigma_src)  # fmt: skip


@torch.no_grad()
def official_rollout(pol, x_start, sigma_start, sigma_end, total_substeps=128, shift=1.0, substep_rule="ceil"):
    """``GMFlowPolicy.rollout`` as the official code runs it (eager posterior every substep)."""
    x_end = official_style.official_style_rollout(_official_policy(pol), x_start.float(), sigma_start, sigma_end,
                                                  total_substeps, shift, substep_rule)  # fmt: skip
    return x_end.to(x_start.dtype)


def official_velocity(pol, x, sigma):
    """``GMFlowPolicy.velocity`` as the official code computes it (eager posterior, autograd through it)."""
    return _official_policy(pol).velocity(x.float(), sigma).to(x.dtype)


class IterationProbe:
    """Times the phases of ``trainer.train_step()`` from outside; :meth:`installed` patches, then restores."""

    def __init__(self, trainer: Any, clock: Clock) -> None:
        self.trainer = trainer
        self.clock = clock
        self.spans = Spans(clock)
        self.velocity_backward: list[tuple[list, list]] = []

    def clear(self) -> None:
        self.spans.clear()
        self.velocity_backward = []

    @contextlib.contextmanager
    def installed(self, variant: str) -> Iterator[None]:
        from piflow_kernels.policies import GMFlowPolicy

        spans, clock, trainer = self.spans, self.clock, self.trainer
        lib_rollout, lib_velocity = GMFlowPolicy.rollout, GMFlowPolicy.velocity  # plain functions (maybe inherited)
        own = {name: GMFlowPolicy.__dict__[name] for name in ("rollout", "velocity") if name in GMFlowPolicy.__dict__}
        rollout_impl = lib_rollout if variant == "library" else official_rollout
        velocity_impl = lib_velocity if variant == "library" else official_velocity
        probe = self

        def rollout(pol, x_start, sigma_start, sigma_end, total_substeps=128, shift=1.0, substep_rule="ceil"):
            with spans.span("policy_rollout"):
                return rollout_impl(pol, x_start, sigma_start, sigma_end, total_substeps, shift, substep_rule)

        def velocity(pol, x, sigma):
            if not torch.is_grad_enabled():
                with spans.span("policy_velocity_forward"):
                    return velocity_impl(pol, x, sigma)
            start, ends = [], []
            tensors = (pol.means, pol.logweights, pol.logstds)
            means, logweights, logstds = (BackwardMark.apply(t, ends, clock.mark) for t in tensors)
            marked = GMFlowPolicy(means, logweights, logstds, pol.x_src, pol.sigma_src, backend=pol.backend)
            with spans.span("policy_velocity_forward"):
                u = velocity_impl(marked, x, sigma)
            probe.velocity_backward.append((start, ends))
            return BackwardMark.apply(u, start, clock.mark)

        autograd_backward = torch.autograd.backward

        def backward(*args, **kwargs):
            with spans.span("backward"):
                return autograd_backward(*args, **kwargs)

        accumulate = trainer.accumulate_gradients

        def accumulate_gradients():
            with spans.span("accumulate"):
                return accumulate()

        teacher = trainer.teacher
        student = trainer.student
        hooks = [student.register_forward_pre_hook(lambda m, a: spans.begin("student_forward")),
                 student.register_forward_hook(lambda m, a, o: spans.end("student_forward"))]  # fmt: skip
        GMFlowPolicy.rollout, GMFlowPolicy.velocity = rollout, velocity
        torch.autograd.backward = backward
        trainer.accumulate_gradients = accumulate_gradients
        trainer.teacher = _TimedTeacher(teacher, spans)
        try:
            yield
        finally:
            for name in ("rollout", "velocity"):  # back to the class's own attributes, or to the inherited ones
                if name in own:
                    setattr(GMFlowPolicy, name, own[name])
                else:
                    delattr(GMFlowPolicy, name)
            torch.autograd.backward = autograd_backward
            del trainer.accumulate_gradients
            trainer.teacher = teacher
            for h in hooks:
                h.remove()

    def iteration(self) -> dict:
        """One ``train_step`` with its phases (ms) and, on CUDA, its peak memory (MiB)."""
        self.clear()
        clock, cuda = self.clock, self.clock.cuda
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        a = clock.mark()
        self.trainer.train_step()
        b = clock.mark()
        clock.sync()
        s, ms = self.spans, clock.ms
        vel_bwd = 0.0
        for start, ends in self.velocity_backward:
            if start and ends:
                vel_bwd += max(ms(start[0], e) for e in ends)
        backward = s.total_ms("backward")
        acc = s.marks["accumulate"][0]
        row = dict(
            iteration_ms=ms(a, b),
            teacher_forward_ms=s.total_ms("teacher_forward"),
            student_forward_ms=s.total_ms("student_forward"),
            student_backward_ms=backward - vel_bwd,
            policy_rollout_ms=s.total_ms("policy_rollout"),
            policy_velocity_forward_ms=s.total_ms("policy_velocity_forward"),
            policy_velocity_backward_ms=vel_bwd,
            optimizer_ms=ms(acc[1], b),
            backward_ms=backward,
            calls=dict(teacher=s.count("teacher_forward"), student=s.count("student_forward"),
                       rollout=s.count("policy_rollout"), velocity=s.count("policy_velocity_forward"),
                       backward=s.count("backward")),  # fmt: skip
        )
        row["other_ms"] = row["iteration_ms"] - sum(row[k] for k in PHASES if k != "other_ms")
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row["peak_mem_mib"] = peak / 2**20
            row["peak_mem_above_start_mib"] = (peak - base) / 2**20
        return row


# ---------------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, device: str, log: Callable[[str], None] = print) -> dict:
    from piflow_kernels.distill import Trainer

    clock = Clock(device)
    variants = pick_variants(args.variants, VARIANTS)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:  # the trainer writes nothing here
        cfg = train_config(args, device, tmp)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        clock.sync()
        build_s = time.perf_counter() - t0
        student = trainer.student
        doc = dict(
            script="bench.train_step",
            **machine(device, args.commit),
            config=dict(tiny=args.tiny, teacher=cfg.teacher.model, batch_size=cfg.data.batch_size,
                        latent=[cfg.data.channels, cfg.data.height, cfg.data.width], num_classes=cfg.data.num_classes,
                        num_components=cfg.student.num_components, piid=cfg.piid.to_dict(), mode=cfg.data.mode,
                        guidance_scale=cfg.teacher.guidance_scale, autocast_bf16=trainer.use_autocast,
                        warmup=args.warmup, iters=args.iters,
                        timer=clock.timer),  # fmt: skip
            build_s=build_s,
            student_parameters=sum(p.numel() for p in student.parameters()),
            variants={},
        )
        log(f"built the trainer ({doc['student_parameters']:,} student parameters) in {build_s:.1f} s")
        if device == "cuda":
            torch.cuda.synchronize()
            doc["allocated_before_mib"] = torch.cuda.memory_allocated() / 2**20
        probe = IterationProbe(trainer, clock)
        for name in variants:
            with probe.installed(name):
                trainer.iteration = 0  # every variant replays the same iterations: same data and draws
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    probe.iteration()
                warm_s = time.perf_counter() - t0
                rows = [probe.iteration() for _ in range(args.iters)]
            k = median_index([r["iteration_ms"] for r in rows])
            v = dict(rows[k], iteration_used=args.warmup + k, iteration_ms_all=[r["iteration_ms"] for r in rows],
                     warmup_s=warm_s)  # fmt: skip
            if device == "cuda":
                v["peak_mem_mib"] = max(r["peak_mem_mib"] for r in rows)
                v["peak_mem_above_start_mib"] = max(r["peak_mem_above_start_mib"] for r in rows)
            v["rollout_share"] = v["policy_rollout_ms"] / v["iteration_ms"]
            v["policy_share"] = (v["policy_rollout_ms"] + v["policy_velocity_forward_ms"] + v["policy_velocity_backward_ms"]) / v[
                "iteration_ms"
            ]
            doc["variants"][name] = v
            log(f"  {name:<15} iteration {v['iteration_ms']:10.3f} ms  (warm-up {warm_s:.1f} s)")
        trainer.close()
    lib, off = doc["variants"].get("library"), doc["variants"].get("official_style")
    if lib and off:
        doc["official_style_vs_library"] = dict(
            iteration_ratio=off["iteration_ms"] / lib["iteration_ms"],
            rollout_speedup=off["policy_rollout_ms"] / max(lib["policy_rollout_ms"], 1e-9),
        )
    doc["targets"] = [
        target(f"rollouts < 5% of the iteration [{name}] (%)", 100 * v["rollout_share"], 5.0, device)
        for name, v in doc["variants"].items()
    ]
    return doc


# ---------------------------------------------------------------------------------------------- report


def format_report(doc: dict) -> str:
    cfg = doc["config"]
    p = cfg["piid"]
    c, h, w = cfg["latent"]
    lines = [
        f"train_step: {'tiny ' if cfg['tiny'] else ''}DiT GM student (K={cfg['num_components']}), B={cfg['batch_size']} "
        f"x {c}x{h}x{w}, {cfg['mode']}, nfe {p['nfe']}, {p['num_intermediate_states']} states, {p['total_substeps']} "
        f"substeps, bf16 autocast {cfg['autocast_bf16']}; {doc['device']} ({doc['device_name']}); timer: {cfg['timer']}",
        "",
    ]
    names = list(doc["variants"])
    head = f"{'phase (ms)':<28}" + "".join(f"{n:>16}" for n in names)
    lines += [head, "-" * len(head)]
    def row(label: str, key: str, spec: str, scale: float = 1.0) -> str:
        return f"{label:<28}" + "".join(format(scale * doc["variants"][n][key], spec) for n in names)

    for key in ("iteration_ms", *PHASES):
        lines.append(row(key[:-3], key, "16.3f"))
    lines.append(row("rollout share %", "rollout_share", "16.2f", 100.0))
    lines.append(row("policy share % (roll+vel)", "policy_share", "16.2f", 100.0))
    if doc["device"] == "cuda":
        lines.append(row("peak MiB", "peak_mem_mib", "16.1f"))
        lines.append(row("peak MiB above start", "peak_mem_above_start_mib", "16.1f"))
    calls = doc["variants"][names[0]]["calls"] if names else {}
    lines.append(f"calls per iteration: {calls}")
    lines += targets_lines(doc)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = step_parser("train_step", __doc__, "a toy DiT (1 layer, 2 heads of 16, 4x8x8), B=4, K=4, 16 substeps")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default 32; tiny 4)")
    p.add_argument("--num-components", type=int, default=None, help="K (default 32; tiny 4)")
    p.add_argument("--total-substeps", type=int, default=None, help="substeps per unit raw time (default 128; tiny 16)")
    p.add_argument("--nfe", type=int, default=1, help="student NFE the pi-ID segments are laid out for (default 1)")
    p.add_argument("--mode", choices=("data_dependent", "data_free"), default="data_dependent")
    p.add_argument("--window-substeps", type=int, default=0, help="pi-ID mean-velocity window (default 0)")
    p.add_argument("--gm-dropout", type=float, default=0.0)
    p.add_argument("--guidance-scale", type=float, default=1.0, help="!= 1: CFG teacher on timesteps [0, 600]")
    p.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), default="auto", help="auto: bf16 autocast on CUDA")
    add_threads_flag(p)
    return parse_step_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    return step_main(parse_args(argv), "train_step", "DiTTransformer2DModel and the students", run, format_report,
                     warmup=(3, 1), iters=(5, 3))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
