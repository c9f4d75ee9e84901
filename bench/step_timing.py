"""What ``bench.sample_step`` and ``bench.train_step`` share: the clock, timed spans, the command line, the
diffusers check, the report.

Timing: on CUDA every mark is a CUDA event recorded on the current stream, so an interval is device
time between two points of the stream (device idle time while the host is behind included); on CPU a
mark is ``time.perf_counter()``. Intervals are read only after :meth:`Clock.sync`.

    >>> clock = Clock("cuda")
    >>> spans = Spans(clock)
    >>> with spans.span("network"):
    ...     out = model(x)
    >>> clock.sync(); spans.total_ms("network")
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench.runner import format_targets
from bench.timing import device_name, git_commit, versions


class BackwardMark(torch.autograd.Function):
    """Identity whose backward appends ``mark()`` to ``box``: brackets a sub-graph's backward.

        >>> y = BackwardMark.apply(x, box, clock.mark)   # box gets a mark when the gradient reaches y's input
    """

    @staticmethod
    def forward(ctx, x, box, mark):
        ctx.box, ctx.mark = box, mark
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.box.append(ctx.mark())
        return grad, None, None


class Clock:
    """Marks on the device timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device == "cuda"
        #: what the marks are, for the JSON document's config
        self.timer = "CUDA events (device timeline)" if self.cuda else "time.perf_counter"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        """Milliseconds from mark ``a`` to mark ``b`` (after :meth:`sync` on CUDA)."""
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Spans:
    """Named lists of (start, end) marks; totals are read after the clock's sync."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.marks: dict[str, list[tuple[Any, Any]]] = {}
        self._open: dict[str, Any] = {}

    def clear(self) -> None:
        self.marks.clear()
        self._open.clear()

    def begin(self, name: str) -> None:
        self._open[name] = self.clock.mark()

    def end(self, name: str) -> None:
        start = self._open.pop(name, None)
        if start is not None:
            self.marks.setdefault(name, []).append((start, self.clock.mark()))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self.clock.mark()
        try:
            yield
        finally:
            self.marks.setdefault(name, []).append((start, self.clock.mark()))

    def list_ms(self, name: str) -> list[float]:
        return [self.clock.ms(a, b) for a, b in self.marks.get(name, [])]

    def total_ms(self, name: str) -> float:
        return float(sum(self.list_ms(name)))

    def count(self, name: str) -> int:
        return len(self.marks.get(name, []))


def pick_device(requested: str | None) -> str:
    """``requested`` or, when None, "cuda" if a CUDA device is present, else "cpu"."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- command line


def step_parser(script: str, doc: str, tiny_help: str) -> argparse.ArgumentParser:
    """The parser of ``python -m bench.<script>`` with the flags it takes first: --out, --device and --tiny."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{script}", description=doc.splitlines()[0])
    p.add_argument("--out", default=".", help=f"folder for {script}.json (default: the current one)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present, else cpu")
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    return p


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --tiny on CPU, else torch's)")


def parse_step_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Adds the flag every step benchmark takes last (--commit), then parses ``argv``."""
    p.add_argument("--commit", default=None, help="git commit to record (the copy may have no .git)")
    return p.parse_args(argv)


def step_main(
    args: argparse.Namespace,
    script: str,
    what: str,
    run: Callable[[argparse.Namespace, str], dict],
    report: Callable[[dict], str],
    **defaults: tuple[Any, Any],
) -> int:
    """A step benchmark's ``main`` once its flags are parsed; returns the exit status.

    The device (``args.device``, :func:`pick_device`); each unset ``args.<name>`` of ``defaults`` set to its
    (CUDA, CPU) value; the CPU threads (``args.threads``; 1 for ``args.tiny`` on CPU when unset); diffusers
    (``what`` says what for); then ``doc = run(args, device)``, ``report(doc)`` printed and ``doc`` written to
    ``args.out/<script>.json``. Status 2, after printing why, without CUDA for ``--device cuda`` or without diffusers.
    """
    device = pick_device(args.device)
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu --tiny for a dry run)", file=sys.stderr)
        return 2
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if device == "cuda" else on_cpu)
    if args.threads is None and args.tiny and device == "cpu":
        args.threads = 1  # toy shapes: threads only add synchronisation (and stall on a shared machine)
    if args.threads:
        torch.set_num_threads(args.threads)
    if require_diffusers(f"bench.{script}", what) is None:
        return 2
    doc = run(args, device)
    print(report(doc))
    path = write_json(doc, args.out, f"{script}.json")
    print(f"wrote {path}")
    return 0


def pick_variants(text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated variant names of ``text``, each one of ``known`` (else exits with an error)."""
    variants = [v for v in text.split(",") if v]
    for v in variants:
        if v not in known:
            raise SystemExit(f"error: unknown variant {v!r}; choose from {', '.join(known)}")
    return variants


def require_diffusers(script: str, what: str) -> Any | None:
    """diffusers, or None after printing what to install (the GPU image has torch and triton only)."""
    if importlib.util.find_spec("diffusers") is None:
        print(f"error: {script} needs diffusers ({what}), which is not installed: install the diffusers wheel "
              "(pip install diffusers-*.whl, with its dependencies huggingface_hub, safetensors, regex, requests, "
              "filelock, importlib_metadata, Pillow)", file=sys.stderr)  # fmt: skip
        return None
    try:
        return importlib.import_module("diffusers")
    except Exception as err:  # installed but broken (e.g. a missing dependency)
        print(f"error: {script} needs diffusers ({what}), which failed to import ({type(err).__name__}: {err}): "
              "install the diffusers wheel and its dependencies", file=sys.stderr)  # fmt: skip
        return None


def median_index(values: list[float]) -> int:
    """Index of the median element (the lower middle one for an even count)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(values) - 1) // 2]


def machine(device: str, commit: str | None = None) -> dict:
    """Device, versions (diffusers included), commit, threads and time, for the JSON document."""
    v = versions()
    try:
        import diffusers

        v["diffusers"] = diffusers.__version__
    except Exception:
        v["diffusers"] = None
    return dict(
        device=device,
        device_name=device_name(device),
        versions=v,
        git_commit=commit or git_commit(),
        torch_threads=torch.get_num_threads(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def target(name: str, value: float | None, threshold: float, device: str, note: str | None = None) -> dict:
    """One "value <= threshold" target; judged (``met`` True/False) on CUDA only, ``met`` None elsewhere."""
    met = None if (device != "cuda" or value is None) else bool(value <= threshold)
    out = dict(name=name, value=value, threshold=threshold, met=met)
    if note:
        out["note"] = note
    return out


def targets_text(targets: list[dict], device: str) -> str:
    """The targets as lines; on CPU every verdict reads "dry run" (tiny CPU shapes judge nothing)."""
    if device == "cuda":
        return format_targets([dict(t, met=bool(t["met"])) for t in targets])
    lines = []
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  [dry run] {t['name']}: {value} (threshold {t['threshold']})")
    return "\n".join(lines)


def targets_lines(doc: dict) -> list[str]:
    """The report's last lines: the targets of ``doc``, headed as a dry run off CUDA."""
    dry = " (dry run: CPU, the verdicts are not judged)" if doc["device"] != "cuda" else ""
    return ["", "targets:" + dry, targets_text(doc["targets"], doc["device"])]


def median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def write_json(doc: dict, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    return path
