"""Text-to-image pi-ID: where a training iteration's time and memory go, and the prompt cache's throughput.

    python -m bench.text_train_step --out bench/results/text_train_step_cpu.json         # small config, CPU
    python -m bench.text_train_step --quick --out /tmp/t.json                           # smoke run, about a minute
    python -m bench.text_train_step --size large --out OUT/text_train_step_gpu.json     # CUDA (the default there)

A random FLUX.1 pipeline (``FluxTransformer2DModel``, CLIP and T5 text encoders from configs, tokenizers
built from an in-memory vocabulary, a tiny VAE; nothing is downloaded) is saved to a temporary folder, its
prompts are encoded into a prompt cache with ``encode_prompts``, and ``piflow_kernels.distill.Trainer``
distills a GMFlow student from it data-free, at the official pi-FLUX.1 pi-ID settings (4 NFE, K = 8, 4
intermediate states, 128 substeps, a window of 3 substeps, GM dropout 0.1, final step 0.5, shift 3.2, the
teacher ratio decaying over 2000 iterations, embedded guidance 3.5). ``--size`` picks the model (``small``
for a CPU, ``large`` for a GPU: :data:`SIZES`). Needs diffusers, transformers and peft (exits with status 2
naming what is missing). Every timed iteration is ``trainer.train_step()`` unchanged; the script wraps from
outside what it times (instance attributes of the trainer, the policy classes' ``rollout``, ``detach`` and
``keep_components``, ``piid.student_policy`` and ``piid.policy_mean_velocity``, ``torch.autograd.backward``,
forward hooks on the student), all restored after; no library file is edited.

Phases of an iteration (ms):

    data                the trainer's micro-batch: the noise, the prompt-cache draw (PromptSource.draw, also
                        reported alone as cache_draw), the copies to the device
    teacher_forward     every teacher call (classifier-free guidance branches included), no grad
    student_forward     the student's calls (trunk + policy head); the tied teacher's calls of the same module
                        are teacher time
    student_backward    the backward passes less the policy's part of them (gradient-checkpointing
                        recomputation included)
    policy              the GM policy math: building the policies (from the student's output, the detached copy
                        and its GM dropout), the detached policy's rollouts (no grad), the mean velocities
                        (forward, and their backward: from the first gradient reaching a mean velocity's output
                        to the last one leaving the student's output tensors)
    rest                everything else: the segments' random draws, the loss arithmetic, zero_grad,
                        gradient clipping, AdamW, the LR schedule, the EMA (optimizer_ema: from the end of
                        the gradients to the end of the step, a part of rest)

Variants: ``lora`` (LoRA on the official FLUX targets, dropout 0.05, the teacher tied to the student's own
base weights), ``full`` (the whole trunk fine-tuned, a separate frozen teacher), each also with the trunk's
gradient checkpointing (``+gc``). Each variant runs in a fresh process, at each teacher ratio q of
``--teacher-ratios``: every step of a ratio runs at the iteration where the schedule gives q (q = 1 at
the start of a run, 0 once the decay is over), so the steps repeat the same data, noise and draws. The
mean velocities integrate over up to q * (segment - window) + window of raw time; each row also counts the
substeps they ran and those their samples needed.

Timing: ``time.perf_counter``; on CUDA each mark synchronizes the device first (so a phase is the wall time
of its work; the synchronisations remove overlap: the uninstrumented median ``iteration_ms`` is reported
beside the instrumented ``iteration_probed_ms`` whose phases add up). Medians over ``--iters`` iterations
after ``--warmup``; the phases are those of the median instrumented iteration.

Memory: see :func:`peak_iteration_bytes` (measured in one more step after the timed ones) and
:func:`state_bytes`. The prompt cache: :func:`cache_throughput`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.step_timing import BackwardMark

VARIANTS = ("lora", "lora+gc", "full", "full+gc")

# The model and data of each --size. "small" is meant for a CPU (about a second an iteration on two cores),
# "large" for a GPU (a 0.3B-parameter FLUX trunk at 512 x 512 pixels), "quick" is the smoke run's.
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(
        flux=dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12)),
        latent=(16, 16, 16), batch_size=4, max_sequence_length=32, t5=dict(d_model=64, d_kv=32, d_ff=128, num_heads=2),
        clip=dict(hidden_size=32, intermediate_size=64), lora_rank=16, num_components=8, logstd_inner_dim=64,
        piid=dict(nfe=4, num_intermediate_states=4, total_substeps=128),
        num_prompts=512, shard_size=64, encode_batch_size=32,
    ),
    "large": dict(
        flux=dict(num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=8,
                  axes_dims_rope=(16, 56, 56)),
        latent=(16, 64, 64), batch_size=4, max_sequence_length=256, t5=dict(d_model=1024, d_kv=64, d_ff=1024, num_heads=16),
        clip=dict(hidden_size=768, intermediate_size=1024), lora_rank=64, num_components=8, logstd_inner_dim=1024,
        piid=dict(nfe=4, num_intermediate_states=4, total_substeps=128),
        num_prompts=256, shard_size=64, encode_batch_size=32,
    ),
    "quick": dict(
        flux=dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6)),
        latent=(16, 8, 8), batch_size=2, max_sequence_length=8, t5=dict(d_model=16, d_kv=8, d_ff=32, num_heads=2),
        clip=dict(hidden_size=16, intermediate_size=32), lora_rank=4, num_components=4, logstd_inner_dim=16,
        piid=dict(nfe=2, num_intermediate_states=2, total_substeps=16),
        num_prompts=24, shard_size=8, encode_batch_size=8,
    ),
}  # fmt: skip

# the official pi-FLUX.1 pi-ID settings that no --size changes (examples/text/piflux_gm_lora.toml)
PIID = dict(policy_type="GMFlow", window_substeps=3, gm_dropout=0.1, final_step_size_scale=0.5, shift=3.2,
            num_decay_iters=2000, loss_scale=30.0)  # fmt: skip

PHASES = ("data_ms", "teacher_forward_ms", "student_forward_ms", "student_backward_ms", "policy_ms", "rest_ms")
POLICY_PARTS = ("policy_build_ms", "policy_rollout_ms", "policy_mean_velocity_forward_ms", "policy_mean_velocity_backward_ms")
#: every figure of a row of the JSON document (all finite and positive in a healthy run)
ROW_FIGURES = ("iteration_ms", "iteration_probed_ms", *PHASES, *POLICY_PARTS, "cache_draw_ms", "optimizer_ema_ms",
               "policy_share", "peak_iteration_mib", "state_mib")  # fmt: skip

WORDS = ("a photo of the cat dog red blue on in with big small tree house car sky old new green river city night "
         "mountain painting bird flower under over bright dark street window").split()  # fmt: skip


# ---------------------------------------------------------------------------------------------- the pipeline


def build_pipeline(folder: Path, size: dict, seed: int = 0) -> Path:
    """A random FLUX.1 pipeline of ``size`` saved to ``folder`` (float32 weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_max = 77
    from piflow_kernels.tiny import _clip_tokenizer, _t5_tokenizer

    tok, tok2 = _clip_tokenizer(WORDS, clip_max), _t5_tokenizer(WORDS)
    c, t5 = size["clip"], size["t5"]
    channels = size["latent"][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=clip_max,
            projection_dim=c["hidden_size"], eos_token_id=1, bos_token_id=0, pad_token_id=1, **c,
        )).eval()  # fmt: skip
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok2), num_layers=1, **t5)).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8), layers_per_block=1, latent_channels=channels, norm_num_groups=4, sample_size=32,
            shift_factor=0.1159, scaling_factor=0.3611,
        ).eval()  # fmt: skip
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * channels, joint_attention_dim=t5["d_model"], pooled_projection_dim=c["hidden_size"],
            guidance_embeds=True, **size["flux"],
        ).eval()  # fmt: skip
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def make_prompts(n: int, negatives: bool, seed: int = 0) -> list[Any]:
    """``n`` prompts of 5 to 12 words (with negative prompts of 2 to 4 words when ``negatives``)."""
    from piflow_kernels.distill.prompts import Prompt

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(5, 13, (1,), generator=g))
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist()]
        text = " ".join(words) + f" {i}"
        neg = " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(torch.randint(2, 5, (1,), generator=g)),),
                                                      generator=g).tolist()) if negatives else None  # fmt: skip
        out.append(Prompt(text, neg))
    return out


# ---------------------------------------------------------------------------------------------- the prompt cache


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cache_throughput(pipeline_dir: Path, cache_dir: Path, size: dict, dtype: str, device: str, negatives: bool,
                     log: Callable[[str], None], guard: ContentionGuard | None = None) -> tuple[dict, Path]:  # fmt: skip
    """Encode the prompts into ``cache_dir`` and read them back through ``PromptSource.draw``, timed.

    Encoding: ``encode_prompts`` end to end (loading the text encoders, hashing the encoder files, writing the
    shards) and its batches alone (``prompt_cache._encode_batch``, patched with a timer for the call): prompts/s.
    Reading: the stream the trainer reads (``PromptSource.draw`` of batch_size prompts per micro-batch, under
    the FLUX argument names), one epoch of micro-batches, three ways: a fresh ``PromptCache`` (each shard opened
    and its sha256 checked: the first epoch of a run), the same cache's second epoch (shards opened again, at
    most ``max_open_shards`` = 2 held, already verified), and a cache holding every shard (stacking rows
    only); prompts/s and MB/s of the tensors returned. Each measurement is repeated while ``guard`` finds other
    processes busy (an encode into a fresh folder each time). Returns the figures and the cache folder.
    """
    from piflow_kernels.distill import prompt_cache
    from piflow_kernels.distill.data import PromptSource
    from piflow_kernels.layouts import TEXT_ARGS

    prompts = make_prompts(size["num_prompts"], negatives)
    real = prompt_cache._encode_batch
    batch_s: list[float] = []

    def timed_batch(*args: Any, **kwargs: Any) -> Any:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = real(*args, **kwargs)  # returns CPU tensors (the copies wait for the device)
        batch_s.append(time.perf_counter() - t0)
        return out

    guard = guard or ContentionGuard(0.0, 0)
    guard.reset()
    folders: list[Path] = []

    def encode() -> float:
        batch_s.clear()
        folders.append(cache_dir.with_name(f"{cache_dir.name}-{len(folders)}"))
        t0 = time.perf_counter()
        prompt_cache.encode_prompts(pipeline_dir, prompts, folders[-1], batch_size=size["encode_batch_size"], dtype=dtype,
                                    progress=False, max_sequence_length=size["max_sequence_length"],
                                    shard_size=size["shard_size"], device=device)  # fmt: skip
        return time.perf_counter() - t0

    prompt_cache._encode_batch = timed_batch
    try:
        total_s = guard.run(encode)
    finally:
        prompt_cache._encode_batch = real
    cache_dir = folders[-1]
    n = len(prompts)
    encoded = dict(num_prompts=n, batch_size=size["encode_batch_size"], batches=len(batch_s), total_s=total_s,
                  prompts_per_s=n / total_s, batches_s=sum(batch_s), batches_prompts_per_s=n / sum(batch_s),
                  dtype=dtype, negatives=negatives)  # fmt: skip
    log(f"encoded {n} prompts in {total_s:.2f} s ({encoded['prompts_per_s']:.0f} prompts/s end to end, "
        f"{encoded['batches_prompts_per_s']:.0f} prompts/s in the batches)")  # fmt: skip

    b = size["batch_size"]
    steps = n // b
    names = TEXT_ARGS["FluxTransformer2DModel"]
    shards = math.ceil(n / size["shard_size"])

    def epoch(source: PromptSource, first_iteration: int) -> dict:
        t0 = time.perf_counter()
        nbytes = 0
        for it in range(first_iteration, first_iteration + steps):
            nbytes += _nbytes(source.draw(b, it, 0, 1))
        s = time.perf_counter() - t0
        return dict(prompts=steps * b, bytes=nbytes, seconds=s, prompts_per_s=steps * b / s, mb_per_s=nbytes / s / 1e6,
                    draw_ms=s / steps * 1e3)  # fmt: skip

    def first_and_second() -> tuple[dict, dict]:
        fresh = PromptSource(prompt_cache.PromptCache(cache_dir), names, seed=0)
        return epoch(fresh, 0), epoch(fresh, steps)

    held = PromptSource(prompt_cache.PromptCache(cache_dir, max_open_shards=shards), names, seed=0)
    epoch(held, 0)  # opens (and verifies) every shard of the held cache once
    first, second = guard.run(first_and_second)
    read = dict(first_epoch=first, second_epoch=second, shards_held=guard.run(lambda: epoch(held, 0)),
                batch_size=b, shards=shards, shard_size=size["shard_size"],
                bytes_per_prompt=_nbytes(held.cache[0]))  # fmt: skip
    for key in ("first_epoch", "second_epoch", "shards_held"):
        r = read[key]
        log(f"read ({key.replace('_', ' ')}): {r['prompts_per_s']:.0f} prompts/s, {r['mb_per_s']:.1f} MB/s, "
            f"{r['draw_ms']:.3f} ms per draw of {b}")  # fmt: skip
    return dict(encode=encoded, read=read, contention=guard.figures()), cache_dir


# ---------------------------------------------------------------------------------------------- the trainer


def train_config(spec: dict, variant: str, out_dir: str) -> dict:
    """The trainer's config of ``variant`` (a dict for ``TrainConfig.from_dict``)."""
    size = spec["size_config"]
    lora = variant.startswith("lora")
    cuda = spec["device"] == "cuda"
    channels, height, width = size["latent"]
    return dict(
        name=f"bench-text-train-step-{variant}", seed=0, max_iters=10**6, out_dir=out_dir, device=spec["device"],
        mixed_precision="auto", log_every=0, eval_every=0, ckpt_every=0, final_checkpoint=False, save_student=False,
        progress=False, tensorboard=False,
        teacher=dict(kind="diffusers", pretrained=spec["pipeline"], dtype=spec["teacher_dtype"],
                     guidance_scale=spec["guidance_scale"]),
        student=dict(kind="diffusers", num_components=size["num_components"], lora_rank=size["lora_rank"] if lora else 0,
                     lora_dropout=0.05 if lora else 0.0, tie_teacher=True, gradient_checkpointing=variant.endswith("+gc"),
                     kwargs=dict(logstd_inner_dim=size["logstd_inner_dim"], num_logstd_layers=2)),
        data=dict(mode="data_free", batch_size=size["batch_size"], channels=channels, height=height, width=width,
                  prompt_cache=spec["cache"]),
        optim=dict(optimizer="adamw8bit" if cuda else "adamw", lr=1e-4, grad_clip=50.0),
        ema=dict(policy="karras", gamma=7.0, decay=0.9999),
        piid=dict(PIID, **size["piid"]),
        distributed=dict(mode="none"),
    )  # fmt: skip


class _TimedTeacher(torch.nn.Module):
    """The trainer's teacher inside a timed span; in eval mode, so pi-ID's eval-mode guard never toggles it."""

    def __init__(self, inner: Any, probe: IterationProbe) -> None:
        super().__init__()
        self.inner = inner
        self.probe = probe
        self.training = False  # not .eval(): that would also walk into the wrapped teacher

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.probe.span("teacher_forward"):
            self.probe.in_teacher += 1
            try:
                return self.inner(*args, **kwargs)
            finally:
                self.probe.in_teacher -= 1


class IterationProbe:
    """Times the phases of ``trainer.train_step()`` from outside; :meth:`installed` patches, then restores."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.cuda = trainer.device.type == "cuda"
        self.spans: dict[str, list[float]] = {}
        self.in_teacher = 0
        self._student_start: float | None = None
        # per backward call: the marks of the mean velocities' outputs and of the policy tensors (see module doc)
        self._vel_out: list[float] = []
        self._pol_in: list[float] = []
        self.policy_backward: list[float] = []
        self._substeps: list[tuple] = []

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def clear(self) -> None:
        self.spans = {}
        self.policy_backward = []
        self._substeps = []
        self._vel_out.clear()
        self._pol_in.clear()

    def note_substeps(self, bound: inspect.BoundArguments) -> None:
        """The substeps a mean velocity ran (``max_steps``, the host-side bound) and those its samples needed:
        each sample's own count (0 for an interval of under 2 substeps, which takes the local velocity), as
        ``policy_mean_velocity`` counts them."""
        bound.apply_defaults()
        a = bound.arguments
        # counted after the step (the arithmetic would be charged to `rest`)
        self._substeps.append((a["max_steps"], a["raw_start"].detach(), a["raw_end"].detach(), a["total_substeps"],
                               a["substep_rule"]))  # fmt: skip

    def substeps(self) -> dict:
        from piflow_kernels.timesteps import substep_count

        counts = []
        for bound, raw_start, raw_end, total, rule in self._substeps:
            delta = (raw_start - raw_end).float().cpu()
            n = substep_count(delta, total, rule)
            counted = torch.where(torch.round(delta * total) < 2, torch.zeros_like(n), n)
            counts.append((bound, counted))
        return dict(
            run=sum(int(c.max()) if bound is None else bound for bound, c in counts),  # substeps computed, every sample
            batch_max=sum(int(c.max()) for _, c in counts),  # were each call to run its batch's largest count
            sample_mean=sum(float(c.mean()) for _, c in counts),  # a sample's own count, on average
        )

    def add(self, name: str, seconds: float) -> None:
        self.spans.setdefault(name, []).append(seconds * 1e3)

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - t0)

    def total(self, name: str) -> float:
        return float(sum(self.spans.get(name, [])))

    def count(self, name: str) -> int:
        return len(self.spans.get(name, []))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from piflow_kernels.distill import piid
        from piflow_kernels.policies import DXPolicy, GMFlowPolicy

        probe, trainer = self, self.trainer
        micro_batch, accumulate = trainer._micro_batch, trainer.accumulate_gradients
        prompts = trainer.prompts
        draw = prompts.draw
        student_policy, mean_velocity = piid.student_policy, piid.policy_mean_velocity
        # the detached copy of the live policy and its GM dropout are policy building too
        methods = {(cls, name): cls.__dict__.get(name) for cls in (GMFlowPolicy, DXPolicy)
                   for name in ("rollout", "detach", "keep_components") if hasattr(cls, name)}  # fmt: skip
        backward = torch.autograd.backward
        teacher = trainer.teacher

        def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with probe.span(name):
                    return fn(*args, **kwargs)

            return wrapper

        def timed_student_policy(output: Any, *args: Any, **kwargs: Any) -> Any:
            with probe.span("policy_build"):
                if dataclasses.is_dataclass(output):  # GMFlowOutput / DXOutput: mark where the policy's gradient leaves
                    output = dataclasses.replace(output, **{
                        f.name: BackwardMark.apply(getattr(output, f.name), probe._pol_in, probe.clock)
                        for f in dataclasses.fields(output) if isinstance(getattr(output, f.name), torch.Tensor)
                        and getattr(output, f.name).requires_grad
                    })  # fmt: skip
                return student_policy(output, *args, **kwargs)

        signature = inspect.signature(mean_velocity)

        def timed_mean_velocity(*args: Any, **kwargs: Any) -> Any:
            with probe.span("policy_mean_velocity_forward"):
                u = mean_velocity(*args, **kwargs)
            probe.note_substeps(signature.bind(*args, **kwargs))  # after the span: read back with the iteration
            return BackwardMark.apply(u, probe._vel_out, probe.clock) if u.requires_grad else u

        def timed_backward(*args: Any, **kwargs: Any) -> Any:
            with probe.span("backward"):
                out = backward(*args, **kwargs)
            if probe._vel_out and probe._pol_in:
                probe.policy_backward.append((max(probe._pol_in) - min(probe._vel_out)) * 1e3)
            probe._vel_out.clear()  # in place: the marks of the next segment's graph hold these lists
            probe._pol_in.clear()
            return out

        def pre_hook(module: Any, args: Any) -> None:
            if not probe.in_teacher:
                probe._student_start = probe.clock()

        def post_hook(module: Any, args: Any, output: Any) -> None:
            if not probe.in_teacher and probe._student_start is not None:
                probe.add("student_forward", probe.clock() - probe._student_start)
                probe._student_start = None

        hooks = [trainer.student.register_forward_pre_hook(pre_hook), trainer.student.register_forward_hook(post_hook)]
        trainer._micro_batch = timed("data", micro_batch)
        trainer.accumulate_gradients = timed("accumulate", accumulate)
        prompts.draw = timed("cache_draw", draw)
        trainer.teacher = _TimedTeacher(teacher, probe)
        piid.student_policy, piid.policy_mean_velocity = timed_student_policy, timed_mean_velocity
        for cls, name in methods:
            setattr(cls, name, timed("policy_rollout" if name == "rollout" else "policy_copy", getattr(cls, name)))
        torch.autograd.backward = timed_backward
        try:
            yield
        finally:
            torch.autograd.backward = backward
            for (cls, name), own in methods.items():  # back to the class's own attribute, or to the inherited one
                if own is not None:
                    setattr(cls, name, own)
                else:
                    delattr(cls, name)
            piid.student_policy, piid.policy_mean_velocity = student_policy, mean_velocity
            trainer.teacher = teacher
            del prompts.draw, trainer._micro_batch, trainer.accumulate_gradients
            for h in hooks:
                h.remove()

    def iteration(self) -> dict:
        """One instrumented ``train_step`` and its phases (ms)."""
        self.clear()
        t0 = self.clock()
        self.trainer.train_step()
        t1 = self.clock()
        ms = (t1 - t0) * 1e3
        pol_bwd = float(sum(self.policy_backward))
        row = dict(
            iteration_probed_ms=ms,
            data_ms=self.total("data"),
            cache_draw_ms=self.total("cache_draw"),
            teacher_forward_ms=self.total("teacher_forward"),
            student_forward_ms=self.total("student_forward"),
            student_backward_ms=self.total("backward") - pol_bwd,
            policy_build_ms=self.total("policy_build") + self.total("policy_copy"),
            policy_rollout_ms=self.total("policy_rollout"),
            policy_mean_velocity_forward_ms=self.total("policy_mean_velocity_forward"),
            policy_mean_velocity_backward_ms=pol_bwd,
            calls=dict(data=self.count("data"), cache_draw=self.count("cache_draw"), teacher=self.count("teacher_forward"),
                       student=self.count("student_forward"), policy=self.count("policy_build"),
                       rollout=self.count("policy_rollout"), mean_velocity=self.count("policy_mean_velocity_forward"),
                       backward=self.count("backward")),  # fmt: skip
        )
        row["mean_velocity_substeps"] = self.substeps()
        row["policy_ms"] = sum(row[k] for k in POLICY_PARTS)
        row["rest_ms"] = ms - sum(row[k] for k in PHASES if k != "rest_ms")
        # the gradients end with accumulate_gradients; clipping, AdamW, the schedule and the EMA follow
        row["optimizer_ema_ms"] = ms - self.total("accumulate")
        return row


# ---------------------------------------------------------------------------------------------- memory


def state_bytes(trainer: Any) -> int:
    """Bytes of what a run holds between iterations: the student's, the teacher's and the EMA's weights (each
    storage once: a tied teacher and the EMA share the frozen base) and the optimizer's state."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    modules = [trainer.student, trainer.ema.module]
    if isinstance(trainer.teacher, torch.nn.Module):
        modules.append(trainer.teacher)
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            add(t)
    for st in trainer.optimizer.state.values():
        for t in st.values():
            add(t)
    return sum(seen.values())


def peak_iteration_bytes(trainer: Any) -> int:
    """The most bytes live at once among those allocated during one ``train_step`` (activations, gradients,
    temporaries; weights, optimizer state and the EMA are :func:`state_bytes`). The gradients of the previous
    step are freed first (``zero_grad(set_to_none=True)``, which the step does at its start), on every device.

    CUDA: ``torch.cuda.max_memory_allocated()`` over the step less ``memory_allocated()`` before it.
    CPU: the step runs under ``torch.profiler`` with ``profile_memory=True`` and the peak is the running sum of
    its allocation events (+bytes) and of the frees of blocks allocated during the step (-bytes), in time order.
    That is the figure CUDA's allocator statistics give, counted at every tensor allocation and free. The
    alternative, the process's max RSS in a fresh process, was not used: it moves in pages and allocator arenas
    (glibc keeps freed blocks), includes the interpreter and the libraries, and cannot be reset between the
    set-up's own peak (building and loading the models) and the iteration's.
    """
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------- one variant


def _own_parameters(teacher: Any, student: torch.nn.Module) -> int:
    """Parameters of the teacher that are not the student's (0 for the tied teacher: it runs the student's base)."""
    if not isinstance(teacher, torch.nn.Module):
        return 0
    mine = {p.data_ptr() for p in student.parameters()}
    return sum(p.numel() for p in teacher.parameters() if p.data_ptr() not in mine)


def iteration_for_ratio(q: float) -> int:
    """The training iteration at which the teacher-ratio schedule gives ``q``."""
    return int(round((1.0 - q) * PIID["num_decay_iters"]))


def run_variant(spec: dict, variant: str) -> dict:
    """Build the trainer of ``variant`` and time it at every teacher ratio of the spec (this process)."""
    from piflow_kernels.distill import TrainConfig, Trainer
    from piflow_kernels.distill.piid_config import teacher_ratio

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench_text_train_step_") as tmp:
        cfg = TrainConfig.from_dict(train_config(spec, variant, tmp))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        if cuda:
            torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        student = trainer.student
        out = dict(
            variant=variant, build_s=build_s,
            student_parameters=sum(p.numel() for p in student.parameters()),
            trainable_parameters=sum(p.numel() for p in trainer.params),
            teacher=type(trainer.teacher).__name__, teacher_own_parameters=_own_parameters(trainer.teacher, student),
            autocast=trainer.use_autocast,
            optimizer=type(trainer.optimizer).__module__ + "." + type(trainer.optimizer).__name__,
            torch_threads=torch.get_num_threads(), rows=[],
        )  # fmt: skip
        probe = IterationProbe(trainer)
        guard = ContentionGuard(spec.get("max_others", 0.0) if not cuda else 0.0, spec.get("max_repeats", 0))
        for q in spec["teacher_ratios"]:
            it = iteration_for_ratio(q)

            def step(fn: Callable[[], Any] = trainer.train_step, it: int = it) -> Any:
                # every step at iteration `it`: the same teacher ratio, data, noise and draws (the step advances it)
                trainer.iteration = it
                return fn()

            def bare_step() -> float:
                t0 = probe.clock()
                step()
                return (probe.clock() - t0) * 1e3

            for _ in range(spec["warmup"]):
                step()
            guard.reset()
            bare = [guard.run(bare_step) for _ in range(spec["iters"])]
            with probe.installed():
                probed = [guard.run(lambda: step(probe.iteration)) for _ in range(spec["iters"])]
            peak = step(lambda: peak_iteration_bytes(trainer))
            k = sorted(range(len(probed)), key=lambda i: probed[i]["iteration_probed_ms"])[(len(probed) - 1) // 2]
            row = dict(probed[k], variant=variant, teacher_ratio=teacher_ratio(cfg.piid, it), iteration=it,
                       iteration_ms=statistics.median(bare), iteration_ms_all=bare,
                       iteration_probed_ms_all=[r["iteration_probed_ms"] for r in probed],
                       peak_iteration_mib=peak / 2**20, state_mib=state_bytes(trainer) / 2**20)  # fmt: skip
            row["policy_share"] = row["policy_ms"] / row["iteration_probed_ms"]
            row["contention"] = guard.figures()
            if cuda:
                row["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["rows"].append(row)
        trainer.close()
    return out


def _machine_busy_s() -> float | None:
    """CPU seconds every process of the machine has spent busy since boot (Linux ``/proc/stat``; None elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(values) - values[3] - values[4]  # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class ContentionGuard:
    """Repeats a timed call during which other processes used the CPUs (a shared machine).

    Others' share of a call = (the machine's busy CPU time, ``/proc/stat``, less this process's own,
    ``time.process_time``) / (wall time x CPUs). A call whose share is above ``max_others`` is discarded and run
    again, at most ``max_repeats`` times in all per :meth:`reset`; then the calls are kept as they come (the rows
    say how many were discarded and the largest share kept). ``max_others`` 0 turns it off (CUDA: the device's
    time is what is measured).
    """

    def __init__(self, max_others: float, max_repeats: int) -> None:
        self.max_others = max_others
        self.max_repeats = max_repeats
        self.enabled = max_others > 0 and _machine_busy_s() is not None
        self.reset()

    def reset(self) -> None:
        self.discarded = 0
        self.kept: list[float] = []

    def run(self, fn: Callable[[], Any]) -> Any:
        while True:
            busy0, own0, t0 = _machine_busy_s(), time.process_time(), time.perf_counter()
            out = fn()
            if not self.enabled:
                return out
            wall = time.perf_counter() - t0
            others = max(0.0, (_machine_busy_s() - busy0) - (time.process_time() - own0)) / (wall * (os.cpu_count() or 1))
            if others <= self.max_others or self.discarded >= self.max_repeats:
                self.kept.append(others)
                return out
            self.discarded += 1

    def figures(self) -> dict:
        return dict(enabled=self.enabled, max_others=self.max_others, discarded_iterations=self.discarded,
                    others_share_max=max(self.kept) if self.kept else None)  # fmt: skip


def _worker_main(spec_path: str, variant: str, out_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    _quiet()
    result = run_variant(spec, variant)
    with open(out_path, "w") as fh:
        json.dump(result, fh, default=str)
    return 0


def _run_in_fresh_process(spec_path: Path, variant: str, out_path: Path) -> dict:
    """``run_variant`` in a fresh interpreter (no state of another variant: allocator, caches, compiled code)."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "bench.text_train_step", "--worker", str(spec_path), variant, str(out_path)],
                          cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
        return dict(variant=variant, error=f"exit status {proc.returncode}: {tail}", rows=[])
    with open(out_path) as fh:
        result = json.load(fh)
    # the process's CPU time: well under wall time x threads means it waited for the CPUs (another load)
    result["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def cpu_busy(seconds: float = 3.0) -> float | None:
    """The fraction of the machine's CPU time spent busy over ``seconds`` (Linux ``/proc/stat``; None elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(max_wait_s: float, log: Callable[[str], None], threshold: float = 0.1) -> dict:
    """Wait (up to ``max_wait_s``) until the CPUs are at most ``threshold`` busy over 3 s and then over 10 s more;
    the figures for the JSON. A CPU benchmark on a shared machine means nothing while other work runs."""
    t0 = time.perf_counter()
    while True:
        busy = cpu_busy(3.0)
        if busy is not None and busy <= threshold:
            busy = cpu_busy(10.0)  # a lull of a few seconds between someone's jobs is not an idle machine
        if busy is None or busy <= threshold or time.perf_counter() - t0 >= max_wait_s:
            break
    waited = time.perf_counter() - t0
    if busy is not None and busy > threshold:
        log(f"  (the CPUs are still {100 * busy:.0f}% busy after waiting {waited:.0f} s: going on)")
    return dict(cpu_busy_before=busy, waited_s=waited)


# ---------------------------------------------------------------------------------------------- the run


def cpu_model() -> str:
    """The CPU's model name and widest vector ISA, e.g. "AMD EPYC, AVX2"."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else None
    return f"{name}, {isa}" if isa else name


def machine_info(device: str, commit: str | None) -> dict:
    from bench.timing import git_commit, versions

    v = versions()
    for name in ("diffusers", "transformers", "peft"):
        try:
            v[name] = importlib.import_module(name).__version__
        except Exception:
            v[name] = None
    info = dict(device=device, cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), versions=v, git_commit=commit or git_commit(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average_before"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def run(args: argparse.Namespace, device: str, log: Callable[[str], None]) -> dict:
    size_name = "quick" if args.quick else args.size
    size = SIZES[size_name]
    teacher_dtype = "bfloat16" if device == "cuda" else "float32"
    variants = [v for v in args.variants.split(",") if v]
    ratios = [float(q) for q in args.teacher_ratios.split(",") if q]
    doc: dict[str, Any] = dict(
        script="bench.text_train_step",
        machine=machine_info(device, args.commit),
        size=size_name,
        config=dict(
            flux=dict(size["flux"], patch_size=1, in_channels=4 * size["latent"][0], joint_attention_dim=size["t5"]["d_model"],
                      pooled_projection_dim=size["clip"]["hidden_size"], guidance_embeds=True),
            text_encoders=dict(clip=dict(size["clip"], num_hidden_layers=1), t5=dict(size["t5"], num_layers=1),
                               max_sequence_length=size["max_sequence_length"]),
            latent=list(size["latent"]), image_tokens=size["latent"][1] * size["latent"][2] // 4,
            batch_size=size["batch_size"], num_components=size["num_components"], lora_rank=size["lora_rank"],
            logstd_inner_dim=size["logstd_inner_dim"], piid=dict(PIID, **size["piid"]), mode="data_free",
            teacher_dtype=teacher_dtype, guidance_scale=args.guidance_scale, embedded_guidance=3.5,
            num_prompts=size["num_prompts"], shard_size=size["shard_size"], encode_batch_size=size["encode_batch_size"],
            teacher_ratios=ratios, warmup=args.warmup, iters=args.iters, max_others=args.max_others,
            max_repeats=args.max_repeats,
        ),
        timer="time.perf_counter" + (", torch.cuda.synchronize() at every mark" if device == "cuda" else ""),
        memory_method=("torch.cuda.max_memory_allocated() - memory_allocated() over one step" if device == "cuda" else
                       "torch.profiler profile_memory=True: peak running sum of the step's allocation and free events"),
        variants={},
        rows=[],
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_text_") as tmp:
        root = Path(tmp)
        if args.wait_idle > 0:
            doc["cache_idle"] = wait_for_idle(args.wait_idle, log)
        t0 = time.perf_counter()
        pipeline = build_pipeline(root / "flux", size)
        log(f"built the random FLUX.1 pipeline ({size_name}) in {time.perf_counter() - t0:.1f} s")
        guard = ContentionGuard(args.max_others if device == "cpu" else 0.0, args.max_repeats)
        doc["prompt_cache"], cache = cache_throughput(pipeline, root / "cache", size, teacher_dtype, device,
                                                      negatives=args.guidance_scale != 1.0, log=log, guard=guard)  # fmt: skip
        spec = dict(device=device, pipeline=str(pipeline), cache=str(cache), size_config=size,
                    teacher_dtype=teacher_dtype, guidance_scale=args.guidance_scale, teacher_ratios=ratios,
                    warmup=args.warmup, iters=args.iters, threads=args.threads, max_others=args.max_others,
                    max_repeats=args.max_repeats)  # fmt: skip
        spec_path = root / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for variant in variants:
            idle = wait_for_idle(args.wait_idle, log) if args.wait_idle > 0 else {}
            t0 = time.perf_counter()
            if args.in_process:
                result = run_variant(spec, variant)
            else:
                result = _run_in_fresh_process(spec_path, variant, root / f"{variant}.json")
            rows = result.pop("rows")
            doc["variants"][variant] = dict(result, wall_s=time.perf_counter() - t0, **idle)
            if hasattr(os, "getloadavg"):
                doc["variants"][variant]["load_average_after"] = list(os.getloadavg())
            doc["rows"] += rows
            if "error" in result:
                log(f"  {variant}: FAILED: {result['error']}")
            for r in rows:
                log(f"  {variant:<8} q={r['teacher_ratio']:.3f}  iteration {r['iteration_ms']:9.1f} ms  policy share "
                    f"{100 * r['policy_share']:5.1f}%  peak {r['peak_iteration_mib']:8.1f} MiB")  # fmt: skip
    return doc


# ---------------------------------------------------------------------------------------------- report


def format_report(doc: dict) -> str:
    cfg = doc["config"]
    m = doc["machine"]
    f = cfg["flux"]
    hidden = f["attention_head_dim"] * f["num_attention_heads"]
    p = cfg["piid"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} threads"
    lines = [
        f"text_train_step ({doc['size']}): random FLUX.1, {f['num_layers']} double + {f['num_single_layers']} single blocks, "
        f"hidden {hidden}, latents {'x'.join(map(str, cfg['latent']))} ({cfg['image_tokens']} tokens) + "
        f"{cfg['text_encoders']['max_sequence_length']} text tokens, B={cfg['batch_size']}, K={cfg['num_components']}; "
        f"data-free pi-ID, nfe {p['nfe']}, M {p['num_intermediate_states']}, {p['total_substeps']} substeps, window "
        f"{p['window_substeps']}; {doc['machine']['device']} ({where}); torch {m['versions']['torch']}",
        f"timer: {doc['timer']}; memory: {doc['memory_method']}",
        "",
    ]
    head = (f"{'variant':<9}{'q':>6}{'iter ms':>10}{'probed':>9}{'data':>8}{'teacher':>9}{'st fwd':>8}{'st bwd':>8}"
            f"{'policy':>8}{'rest':>8}{'pol %':>7}{'peak MiB':>10}{'state MiB':>10}")  # fmt: skip
    lines += [head, "-" * len(head)]
    for r in doc["rows"]:
        lines.append(
            f"{r['variant']:<9}{r['teacher_ratio']:>6.2f}{r['iteration_ms']:>10.1f}{r['iteration_probed_ms']:>9.1f}"
            f"{r['data_ms']:>8.2f}{r['teacher_forward_ms']:>9.1f}{r['student_forward_ms']:>8.1f}{r['student_backward_ms']:>8.1f}"
            f"{r['policy_ms']:>8.1f}{r['rest_ms']:>8.1f}{100 * r['policy_share']:>7.1f}{r['peak_iteration_mib']:>10.1f}"
            f"{r['state_mib']:>10.1f}"
        )  # fmt: skip
    lines += ["", "policy parts (ms): build / rollouts / mean velocity forward / backward; optimizer+EMA (ms, part of rest); "
                  "substeps of the iteration's mean velocities"]
    for r in doc["rows"]:
        lines.append(
            f"{r['variant']:<9}{r['teacher_ratio']:>6.2f}  {r['policy_build_ms']:.2f} / {r['policy_rollout_ms']:.1f} / "
            f"{r['policy_mean_velocity_forward_ms']:.1f} / {r['policy_mean_velocity_backward_ms']:.1f};  "
            f"{r['optimizer_ema_ms']:.1f};  mean-velocity substeps run {r['mean_velocity_substeps']['run']}, "
            f"needed {r['mean_velocity_substeps']['sample_mean']:.0f} (batch max {r['mean_velocity_substeps']['batch_max']}); "
            f"{r['contention']['discarded_iterations']} contended iterations repeated"
        )  # fmt: skip
    if doc["rows"]:
        lines.append(f"calls per iteration: {doc['rows'][0]['calls']}")
    for name, v in doc["variants"].items():
        if "error" in v:
            lines.append(f"{name}: FAILED: {v['error'][:500]}")
        else:
            extra = ""
            if "process_cpu_s" in v:
                extra += f", {v['process_cpu_s']:.0f} CPU s in {v['wall_s']:.0f} s"
            if v.get("cpu_busy_before") is not None:
                extra += f", CPUs {100 * v['cpu_busy_before']:.0f}% busy before"
            lines.append(f"{name}: {v['trainable_parameters']:,} trained of {v['student_parameters']:,} student parameters, "
                         f"teacher {v['teacher']} ({v['teacher_own_parameters']:,} parameters of its own), "
                         f"built in {v['build_s']:.1f} s{extra}")  # fmt: skip
    pc = doc.get("prompt_cache")
    if pc:
        e, rd = pc["encode"], pc["read"]
        lines += ["", f"prompt cache: {e['num_prompts']} prompts, {rd['shards']} shards of {rd['shard_size']}, "
                      f"{rd['bytes_per_prompt'] / 1e3:.1f} kB per prompt ({e['dtype']})",
                  f"  encode_prompts: {e['prompts_per_s']:.0f} prompts/s end to end ({e['total_s']:.2f} s), "
                  f"{e['batches_prompts_per_s']:.0f} prompts/s in the encoder batches of {e['batch_size']}"]  # fmt: skip
        for key in ("first_epoch", "second_epoch", "shards_held"):
            r = rd[key]
            lines.append(f"  PromptSource.draw ({key.replace('_', ' ')}): {r['prompts_per_s']:.0f} prompts/s, "
                         f"{r['mb_per_s']:.1f} MB/s, {r['draw_ms']:.3f} ms per draw of {rd['batch_size']}")  # fmt: skip
    return "\n".join(lines)


def check_figures(doc: dict) -> list[str]:
    """What is missing, not finite or not positive in ``doc`` (empty for a healthy run)."""
    bad = []
    for r in doc["rows"]:
        for key in ROW_FIGURES:
            v = r.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad.append(f"{r.get('variant')} q={r.get('teacher_ratio')}: {key} = {v!r}")
    for name, v in doc["variants"].items():
        if "error" in v:
            bad.append(f"{name}: failed")
    return bad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.text_train_step", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write (the log goes beside it, .log)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present, else cpu")
    p.add_argument("--size", choices=("small", "large"), default=None, help="default: large on CUDA, small on CPU")
    p.add_argument("--quick", action="store_true", help="a smoke run: a toy config, 1 warm-up and 2 timed iterations")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--teacher-ratios", default="1,0", help="teacher ratios q to run each variant at (default 1,0)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per ratio (default 2; quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per ratio (default 5; quick 2)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="!= 1: true CFG against cached negative prompts (default 1: FLUX.1-dev's embedded guidance only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick on CPU)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before the cache and each variant, wait up to S seconds for the CPUs to be idle (< 10%% busy)")
    p.add_argument("--max-others", type=float, default=None, metavar="F",
                   help="CPU: repeat a timed iteration during which other processes used more than F of the CPUs "
                        "(default 0.05; 0 with --quick: off)")
    p.add_argument("--max-repeats", type=int, default=None,
                   help="at most this many repeated iterations per variant and ratio (default 4 x --iters)")
    p.add_argument("--in-process", action="store_true", help="run the variants in this process (default: one fresh each)")
    p.add_argument("--commit", default=None, help="git commit to record (the copy may have no .git)")
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v and v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.iters is None:
        args.iters = 2 if args.quick else 5
    if args.max_others is None:
        args.max_others = 0.0 if args.quick else 0.05
    if args.max_repeats is None:
        args.max_repeats = 4 * args.iters
    return args


def _quiet() -> None:
    """No progress bars or notices of diffusers and transformers (saving, loading, truncating the toy prompts)."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(*argv[1:4])
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    missing = [name for name in ("diffusers", "transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: bench.text_train_step needs {', '.join(missing)} (the FLUX.1 pipeline, its text encoders and the "
              f"LoRA adapters), which {'is' if len(missing) == 1 else 'are'} not installed: install the wheels "
              f"(pip install {' '.join(missing)}) and run it again", file=sys.stderr)  # fmt: skip
        return 2
    if args.size is None:
        args.size = "large" if device == "cuda" else "small"
    if args.threads is None and args.quick and device == "cpu":
        args.threads = 1  # toy shapes: a second thread only adds synchronisation (and stalls on a shared machine)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet()
    out = Path(args.out)
    log_path = out.with_suffix(".log")
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    doc = run(args, device, log)
    report = format_report(doc)
    log("")
    log(report)
    bad = check_figures(doc)
    for b in bad:
        log(f"error: {b}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    log_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {log_path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
