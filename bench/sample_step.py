"""A whole 4-NFE pi-Flow sample at FLUX.1-dev size: network vs policy vs host gaps, per step.

    PYTHONPATH=. python -m bench.sample_step --out OUT                       # CUDA, after bench.gpu_check
    PYTHONPATH=. python -m bench.sample_step --tiny --device cpu --out /tmp/s   # CPU dry run, seconds

A FluxTransformer2DModel of the FLUX.1-dev config (random bf16 weights, built on the device, nothing
downloaded) becomes a GMFlow student (``pk.build_student(teacher, "GMFlow", num_components=8,
copy_teacher=False)``), sampled by ``pk.sample`` with ``pk.PiFlowScheduler`` (the pi-FLUX settings: shift
3.2, last step half size, temperature "auto", 128 substeps per unit raw time) from 1x16x128x128 noise
(1024x1024 images, 4096 packed tokens) with random prompt embeddings (512 x 4096, pooled 768,
guidance 3.5). Per step it reports the network time (the student call), the policy time
(``scheduler.step``: policy, temperature, rollout) and the host gaps (the rest of the sample: the
loop, ``set_timesteps``); totals, the policy share and the overhead over 4 bare network calls (the
same calls back to back, nothing in between). Variants:

    eager            eager trunk, ``pk.sample``
    compiled         each transformer block under ``torch.compile`` (regional compilation), ``pk.sample``
    compiled+graph   compiled trunk; the policy part of each step (policy, temperature, rollout) replayed
                     as a CUDA graph captured per step (CUDA only); the loop is ``pk.sample``'s
    eager+graph      eager trunk, graphed policy steps (CUDA only; not run by default)

Then each step's policy part alone on the trunk's own outputs from the eager sample: the library,
the library as a CUDA graph, and the official-style eager loop (``bench/official_style.py``:
temperature, posterior recomputed every substep, one host read per rollout).

Targets (judged on CUDA only): policy share of a 4-NFE sample < 1%; the whole sample within 5% of 4
bare network calls. Writes ``OUT/sample_step.json``. Needs diffusers (install its wheel on the GPU image).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import official_style
from bench.step_timing import (
    Clock,
    add_threads_flag,
    machine,
    median,
    median_index,
    parse_step_args,
    pick_variants,
    step_main,
    step_parser,
    target,
    targets_lines,
)
from bench.timing import time_fn

#: FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json)
FLUX_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: the same architecture at toy size (runs in seconds on a CPU)
TINY_CONFIG = dict(
    FLUX_DEV_CONFIG,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
FULL_SHAPE = dict(latent=(16, 128, 128), text_len=512)
TINY_SHAPE = dict(latent=(16, 8, 8), text_len=8)
VARIANTS = ("eager", "compiled", "compiled+graph", "eager+graph")
NUM_STEPS = 4
# substep_rule "round": the official-style baseline and _substeps count as the official code did before v0.2.0, so
# both sides of the comparison run the same substeps
SCHEDULER = dict(shift=3.2, final_step_size_scale=0.5, temperature="auto", total_substeps=128, h=0.0, substep_rule="round")
GUIDANCE = 3.5

# ---------------------------------------------------------------------------------------------- models


def build_flux(diffusers: Any, config: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A FluxTransformer2DModel with random weights, created directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # parameters born in bf16: no fp32 copy of 12B weights
        with torch.device(device):
            model = diffusers.FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def compile_blocks(trunk: torch.nn.Module, mode: str | None) -> int:
    """``torch.compile`` each repeated transformer block in place (regional compilation); returns how many."""
    names = set(getattr(trunk, "_repeated_blocks", None) or ("FluxTransformerBlock", "FluxSingleTransformerBlock"))
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, key, max(getattr(cfg, key), 64))  # one graph per block class is expected; never fall back to eager
    n = 0
    for module in trunk.modules():
        if type(module).__name__ in names:
            module.compile(mode=mode)
            n += 1
    if n == 0:
        raise RuntimeError(f"no {sorted(names)} blocks found to compile in {type(trunk).__name__}")
    return n


def flux_ids(h: int, w: int, text_len: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """img_ids (h*w, 3) and txt_ids (text_len, 3) as the FLUX pipeline (and the student) build them."""
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3), torch.zeros(text_len, 3, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- timing


class StepRecorder:
    """Marks around every network call and every policy step of a sample; optionally keeps the step inputs."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.capture: list | None = None
        self.reset()

    def reset(self) -> None:
        self.network: list[tuple[Any, Any]] = []
        self.policy: list[tuple[Any, Any]] = []

    def wrap_network(self, fn: Callable) -> Callable:
        def call(x, t, **kw):
            a = self.clock.mark()
            out = fn(x, t, **kw)
            self.network.append((a, self.clock.mark()))
            if self.capture is not None:
                self.capture.append([out, x])
            return out

        return call

    def wrap_policy(self, fn: Callable) -> Callable:
        def call(*args, **kw):
            a = self.clock.mark()
            out = fn(*args, **kw)
            self.policy.append((a, self.clock.mark()))
            return out

        return call

    def breakdown(self, start: Any, end: Any) -> dict:
        """Per step: network, policy and host gap (before the network call plus between network and policy)."""
        ms = self.clock.ms
        steps, prev = [], start
        for i, ((na, nb), (pa, pb)) in enumerate(zip(self.network, self.policy)):
            steps.append(dict(step=i, network_ms=ms(na, nb), policy_ms=ms(pa, pb), host_gap_ms=ms(prev, na) + ms(nb, pa)))
            prev = pb
        tail = ms(prev, end)
        return dict(
            steps=steps,
            sample_ms=ms(start, end),
            network_ms=sum(s["network_ms"] for s in steps),
            policy_ms=sum(s["policy_ms"] for s in steps),
            host_gap_ms=sum(s["host_gap_ms"] for s in steps) + tail,
            tail_ms=tail,
        )


class GraphedPolicySteps:
    """The policy part of each sampler step (policy, temperature, rollout) as one CUDA graph per step.

    Inputs are copied into the graph's static buffers at each call (those copies are part of the timed step).
    """

    def __init__(self, step_fn: Callable, examples: list) -> None:
        from piflow_kernels import GMFlowOutput

        self.graphs, self.inputs, self.outputs = [], [], []
        for out, x in examples:
            fields = GMFlowOutput(means=out.means.clone(), logweights=out.logweights.clone(), logstds=out.logstds.clone())
            self.inputs.append((fields, x.clone()))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton JIT and autotuning outside the capture
            for i, (fields, x) in enumerate(self.inputs):
                for _ in range(2):
                    step_fn(i, fields, x)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = None
        for i, (fields, x) in enumerate(self.inputs):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs.append(step_fn(i, fields, x))
            pool = graph.pool()
            self.graphs.append(graph)
        torch.cuda.synchronize()

    def __call__(self, index: int, out: Any, x: torch.Tensor) -> torch.Tensor:
        fields, static_x = self.inputs[index]
        fields.means.copy_(out.means)
        fields.logweights.copy_(out.logweights)
        fields.logstds.copy_(out.logstds)
        static_x.copy_(x)
        self.graphs[index].replay()
        return self.outputs[index]


# ---------------------------------------------------------------------------------------------- the run


def _substeps(schedule: Any, total_substeps: int) -> list[int]:
    from piflow_kernels.timesteps import unwarp

    out = []
    for s0, s1 in zip(schedule.sigmas[:-1], schedule.sigmas_dst):
        delta = unwarp(s0, schedule.shift) - unwarp(s1, schedule.shift)
        out.append(max(1, round(delta * total_substeps)))
    return out


def run(args: argparse.Namespace, device: str, log: Callable[[str], None] = print) -> dict:
    import diffusers

    import piflow_kernels as pk
    from piflow_kernels.layouts import image_to_packed
    from piflow_kernels.sampling import flowmap_schedule, flowmap_step, policy_from_output

    clock = Clock(device)
    dtype = getattr(torch, args.dtype)
    config = dict(TINY_CONFIG if args.tiny else FLUX_DEV_CONFIG)
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    c, hgt, wid = shape["latent"]
    if args.latent_hw:
        hgt = wid = args.latent_hw
    text_len, batch = args.text_len or shape["text_len"], 1
    if hgt % 2:
        raise SystemExit(f"error: --latent-hw must be even (2x2 packed tokens), got {hgt}")
    tokens = (hgt // 2) * (wid // 2)
    variants = pick_variants(args.variants, VARIANTS)
    skipped = {v: "CUDA graphs need a CUDA device" for v in variants if v.endswith("+graph") and device != "cuda"}
    variants = [v for v in variants if v not in skipped]

    doc = dict(
        script="bench.sample_step",
        **machine(device, args.commit),
        config=dict(
            tiny=args.tiny, transformer=config, dtype=args.dtype, batch=batch, latent=[c, hgt, wid], tokens=tokens,
            text_len=text_len, num_steps=NUM_STEPS, num_components=args.num_components, scheduler=SCHEDULER,
            guidance=GUIDANCE, repeats=args.repeats, compile_mode=args.compile_mode,
            compile_scope="each FluxTransformerBlock / FluxSingleTransformerBlock (regional)",
            timer=clock.timer,
        ),  # fmt: skip
        variants={},
        skipped_variants=skipped,
    )

    # ------------------------------------------------------------------ inputs and the teacher
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    noise = torch.randn(batch, c, hgt, wid, generator=g).to(device, dtype)
    cond = dict(
        encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, dtype),
        guidance=torch.full((batch,), GUIDANCE, device=device, dtype=torch.float32),
    )
    t0 = time.perf_counter()
    teacher = build_flux(diffusers, config, device, dtype, args.seed)
    clock.sync()
    doc["build_s"] = time.perf_counter() - t0
    doc["parameters"] = sum(p.numel() for p in teacher.parameters())
    log(f"built FluxTransformer2DModel ({doc['parameters'] / 1e6:.1f}M parameters, {args.dtype}) in {doc['build_s']:.1f} s")

    sched = pk.PiFlowScheduler(**SCHEDULER)
    sched.set_timesteps(NUM_STEPS, device=device, seq_len=tokens)
    timesteps = sched.timesteps

    def bare(fn: Callable) -> float:
        a = clock.mark()
        for t in timesteps:
            fn(t)
        b = clock.mark()
        clock.sync()
        return clock.ms(a, b)

    if args.teacher_baseline:
        packed = image_to_packed(noise, 2)
        img_ids, txt_ids = flux_ids(hgt // 2, wid // 2, text_len, device, dtype)

        def teacher_call(t):
            return teacher(hidden_states=packed, timestep=(t / 1000).expand(batch), img_ids=img_ids, txt_ids=txt_ids,
                           return_dict=False, **cond)[0]  # fmt: skip

        with torch.no_grad():
            bare(teacher_call)
            runs = [bare(teacher_call) for _ in range(args.repeats)]
        doc["teacher_bare_network_ms"] = median(runs)
        doc["teacher_bare_network_ms_all"] = runs
        log(f"stock FLUX transformer, 4 bare calls: {doc['teacher_bare_network_ms']:.3f} ms")

    # ------------------------------------------------------------------ the student and the samplers
    student = pk.build_student(teacher, policy_type="GMFlow", num_components=args.num_components, copy_teacher=False)
    student.eval().requires_grad_(False)  # copy_teacher=False: the teacher module is now the student's trunk

    rec = StepRecorder(clock)
    sched.step = rec.wrap_policy(sched.step)  # the instance attribute pk.sample's loop calls
    net = rec.wrap_network(student)
    schedule = flowmap_schedule(sched.raw_sigmas(NUM_STEPS), sched.shift, sched.config.h)
    substeps = _substeps(schedule, SCHEDULER["total_substeps"])
    doc["config"]["substeps_per_step"] = substeps
    doc["config"]["sigmas"] = schedule.sigmas

    def library_step(i: int, out: Any, x: torch.Tensor) -> torch.Tensor:
        """scheduler.step's math through the public sampling functions (what the CUDA graph captures)."""
        x32 = x.float()
        policy = policy_from_output(out, x32, schedule.sigmas[i], "GMFlow", backend=sched.config.backend)
        return flowmap_step(policy, x32, i, schedule, SCHEDULER["total_substeps"], sched.step_temperature(i),
                            substep_rule=SCHEDULER["substep_rule"]).to(x.dtype)  # fmt: skip

    def official_step(i: int, out: Any, x: torch.Tensor) -> torch.Tensor:
        """The same step in the official code's style: temperature, then the eager posterior loop in float32."""
        x32 = x.float()
        temp = sched.step_temperature(i)
        logweights, logstds = out.logweights.float(), out.logstds.float()
        if temp < 1.0:
            logweights = torch.log_softmax(logweights / temp, dim=1)
            logstds = logstds + 0.5 * math.log(temp)
        pol = official_style.OfficialStyleGMPolicy(out.means.float(), logweights, logstds, x32, schedule.sigmas[i])
        x_end = official_style.official_style_rollout(pol, x32, schedule.sigmas[i], schedule.sigmas_dst[i],
                                                      SCHEDULER["total_substeps"], schedule.shift)  # fmt: skip
        return x_end.to(x.dtype)

    def sample_with_scheduler() -> torch.Tensor:
        return pk.sample(net, noise, NUM_STEPS, scheduler=sched, progress=False, seq_len=tokens, **cond)

    graphs: dict[str, GraphedPolicySteps] = {}

    def sample_with_graphs() -> torch.Tensor:
        # pk.sample's loop with the graphed policy steps in place of scheduler.step
        sched.set_timesteps(NUM_STEPS, device=device, seq_len=tokens)
        step = rec.wrap_policy(graphs["steps"])
        x = noise
        for i, t in enumerate(sched.timesteps):
            x = step(i, net(x, t.expand(batch), **cond), x)
        return x

    def timed(fn: Callable[[], torch.Tensor]) -> tuple[dict, torch.Tensor]:
        rec.reset()
        a = clock.mark()
        x = fn()
        b = clock.mark()
        clock.sync()
        return rec.breakdown(a, b), x

    def student_call(t):
        return student(noise, t.expand(batch), **cond)

    # first eager sample: warm-up (native / Triton builds) and the trunk outputs of every step
    with torch.no_grad():
        rec.capture = []
        t0 = time.perf_counter()
        x_final = sample_with_scheduler()
        clock.sync()
        first_eager_s = time.perf_counter() - t0
        captured, rec.capture = rec.capture, None
        nexts = [x for _, x in captured[1:]] + [x_final]
        checks = dict(final_latents_finite=bool(torch.isfinite(x_final.float()).all()))
        diffs = [float((library_step(i, out, x).float() - nxt.float()).abs().max()) for i, ((out, x), nxt) in
                 enumerate(zip(captured, nexts))]  # fmt: skip
        checks["library_step_vs_scheduler_step_max_abs_diff"] = max(diffs)
        rel = []
        for i, (out, x) in enumerate(captured):
            ref, got = library_step(i, out, x).float(), official_step(i, out, x).float()
            rel.append(float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)))
        checks["official_style_vs_library_max_rel_diff"] = max(rel)
        if device == "cuda":
            graphs["steps"] = GraphedPolicySteps(library_step, captured)
            gdiff = [float((graphs["steps"](i, out, x).float() - nxt.float()).abs().max()) for i, ((out, x), nxt) in
                     enumerate(zip(captured, nexts))]  # fmt: skip
            checks["graphed_step_vs_scheduler_step_max_abs_diff"] = max(gdiff)
        doc["checks"] = checks

        # each step's policy part alone, on the captured trunk outputs
        iso = []
        for i, (out, x) in enumerate(captured):
            row = dict(step=i, substeps=substeps[i], temperature=sched.step_temperature(i))
            row["library_ms"] = time_fn(lambda i=i, out=out, x=x: library_step(i, out, x), device,
                                        target_ms=args.target_ms).median_ms  # fmt: skip
            if "steps" in graphs:
                row["library_graphed_ms"] = time_fn(lambda i=i, out=out, x=x: graphs["steps"](i, out, x), device,
                                                    target_ms=args.target_ms).median_ms  # fmt: skip
            row["official_style_ms"] = time_fn(lambda i=i, out=out, x=x: official_step(i, out, x), device,
                                               target_ms=args.target_ms).median_ms  # fmt: skip
            row["speedup_vs_official"] = row["official_style_ms"] / row["library_ms"]
            iso.append(row)
        doc["policy_step_isolated"] = iso
        doc["official_style_posterior_scripted"] = official_style.posterior_is_scripted()

        # the sample variants: eager trunk first, then the compiled one
        compiled = False
        for name in sorted(variants, key=lambda v: v.startswith("compiled")):
            if name.startswith("compiled") and not compiled:  # lazy: the blocks compile in the warm-up sample
                doc["compiled_blocks"] = compile_blocks(student.trunk, args.compile_mode)
                compiled = True
            run_fn = sample_with_graphs if name.endswith("+graph") else sample_with_scheduler
            t0 = time.perf_counter()
            run_fn()  # warm-up (the compilation happens here)
            clock.sync()
            first_s = first_eager_s if name == "eager" else time.perf_counter() - t0
            bare(student_call)
            runs, bares = [], []
            for _ in range(args.repeats):
                runs.append(timed(run_fn)[0])
                bares.append(bare(student_call))
            k = median_index([r["sample_ms"] for r in runs])
            v = dict(runs[k], repeat_used=k, sample_ms_all=[r["sample_ms"] for r in runs], bare_network_ms=median(bares),
                     bare_network_ms_all=bares, first_sample_s=first_s)  # fmt: skip
            v["policy_share"] = v["policy_ms"] / v["sample_ms"]
            v["overhead_vs_bare"] = v["sample_ms"] / v["bare_network_ms"] - 1.0
            doc["variants"][name] = v
            log(f"  {name:<15} sample {v['sample_ms']:10.3f} ms  (first sample {first_s:.2f} s)")

    # projected: the eager sample with the official-style policy step in place of the library's
    eager = doc["variants"].get("eager")
    if eager:
        official_total = sum(r["official_style_ms"] for r in iso)
        doc["official_style_projected"] = dict(
            policy_ms=official_total,
            sample_ms=eager["network_ms"] + eager["host_gap_ms"] + official_total,
            policy_share=official_total / (eager["network_ms"] + eager["host_gap_ms"] + official_total),
        )
    doc["targets"] = []
    for name, v in doc["variants"].items():
        doc["targets"].append(target(f"policy share of a 4-NFE sample < 1% [{name}] (%)", 100 * v["policy_share"], 1.0, device))
        doc["targets"].append(target(f"whole sample within 5% of 4 bare network calls [{name}] (% over)",
                                     100 * v["overhead_vs_bare"], 5.0, device))  # fmt: skip
    return doc


# ---------------------------------------------------------------------------------------------- report


def format_report(doc: dict) -> str:
    cfg = doc["config"]
    c, h, w = cfg["latent"]
    lines = [
        f"sample_step: {'tiny ' if cfg['tiny'] else ''}FLUX GM student (K={cfg['num_components']}), "
        f"{cfg['batch']}x{c}x{h}x{w} latents ({cfg['tokens']} tokens), {cfg['num_steps']} steps, substeps "
        f"{cfg.get('substeps_per_step')}, {cfg['dtype']}; {doc['device']} ({doc['device_name']}); timer: {cfg['timer']}",
        "",
        f"{'variant':<15} {'step':>5} {'network ms':>11} {'policy ms':>10} {'host gap ms':>12}",
    ]
    lines.append("-" * len(lines[-1]))
    for name, v in doc["variants"].items():
        for s in v["steps"]:
            lines.append(f"{name:<15} {s['step']:>5} {s['network_ms']:11.3f} {s['policy_ms']:10.3f} {s['host_gap_ms']:12.3f}")
        lines.append(f"{name:<15} {'all':>5} {v['network_ms']:11.3f} {v['policy_ms']:10.3f} {v['host_gap_ms']:12.3f}   "
                     f"sample {v['sample_ms']:.3f} ms; 4 bare network calls {v['bare_network_ms']:.3f} ms; "
                     f"policy share {100 * v['policy_share']:.3f}%; over bare {100 * v['overhead_vs_bare']:+.2f}%")  # fmt: skip
    if doc.get("teacher_bare_network_ms") is not None:
        lines.append(f"stock FLUX transformer (no policy head), 4 bare calls: {doc['teacher_bare_network_ms']:.3f} ms")
    for name, why in doc.get("skipped_variants", {}).items():
        lines.append(f"{name:<15} skipped: {why}")
    lines += ["", "policy part of each step alone, on the eager sample's trunk outputs (median ms)"]
    lines.append(f"{'step':>5} {'subst':>6} {'temp':>5} {'library':>10} {'lib+graph':>10} {'official':>10} {'speedup':>8}")
    lines.append("-" * len(lines[-1]))
    for r in doc["policy_step_isolated"]:
        graphed = f"{r['library_graphed_ms']:10.3f}" if "library_graphed_ms" in r else f"{'-':>10}"
        lines.append(f"{r['step']:>5} {r['substeps']:>6} {r['temperature']:>5.2f} {r['library_ms']:10.3f} {graphed} "
                     f"{r['official_style_ms']:10.3f} {r['speedup_vs_official']:7.1f}x")  # fmt: skip
    proj = doc.get("official_style_projected")
    if proj:
        lines.append(f"official-style policy in the eager sample (projected): {proj['policy_ms']:.3f} ms, "
                     f"share {100 * proj['policy_share']:.2f}%")  # fmt: skip
    checks = [f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in doc["checks"].items()]
    lines.append("checks: " + ", ".join(checks))
    lines += targets_lines(doc)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = step_parser("sample_step", __doc__, "a toy FLUX config (1 + 1 blocks, 2 heads of 16, 8x8 latent)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: eager,compiled,compiled+graph on "
                        "CUDA, eager on CPU)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="timed samples per variant (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--latent-hw", type=int, default=None, help="latent height = width (default 128, 1024x1024 images; tiny 8)")
    p.add_argument("--text-len", type=int, default=None, help="prompt tokens (default 512; tiny 8)")
    p.add_argument("--num-components", type=int, default=8, help="K of the GM student (default 8, as pi-FLUX)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the blocks (default: torch's default)")
    p.add_argument("--no-teacher-baseline", dest="teacher_baseline", action="store_false",
                   help="skip the 4 bare calls of the stock transformer before the conversion")  # fmt: skip
    p.add_argument("--target-ms", type=float, default=None, help="time per isolated policy-step measurement")
    add_threads_flag(p)
    p.add_argument("--seed", type=int, default=0)
    return parse_step_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    return step_main(parse_args(argv), "sample_step", "FluxTransformer2DModel and pk.build_student", run, format_report,
                     variants=("eager,compiled,compiled+graph", "eager"), repeats=(5, 3), target_ms=(300.0, 30.0))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
