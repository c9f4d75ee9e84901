"""Training configuration of the pi-ID trainer: one dataclass, loadable from TOML or JSON.

A config file has top-level run settings and one section per concern::

    seed = 0
    max_iters = 200
    [teacher]            # "exact" (Gaussian-mixture data, closed-form velocity) or "diffusers"
    [student]            # "toy" (small MLP heads) or "diffusers" (build_student on the teacher)
    [data]               # latent shape, per-rank batch size, pi-ID mode and data source
    [optim]              # AdamW, linear warm-up, gradient clipping and accumulation
    [ema]                # EMA of the student (used for evaluation)
    [piid]               # fields of piflow_kernels.distill.piid.PiIDConfig (nfe, policy_type, backend, ...)
    [eval]               # periodic sampling with the EMA student
    [distributed]        # DDP / FSDP2 under torchrun

    >>> cfg = TrainConfig.from_file("examples/distill_exact_teacher.toml")
    >>> cfg = cfg.replace(max_iters=10)
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True

Every key is checked: an unknown key, a value of the wrong type or out of range raises
:class:`ConfigError` naming the key (``data.batch_size``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piflow_kernels.distill.config_sections import (
    DataConfig,
    DistributedConfig,
    EMAConfig,
    EvalConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
)
from piflow_kernels.distill.lr_scheduler import LR_DECAYS
from piflow_kernels.distill.piid_config import PiIDConfig

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TeacherConfig",
    "StudentConfig",
    "DataConfig",
    "OptimConfig",
    "EMAConfig",
    "EvalConfig",
    "DistributedConfig",
    "load_config_file",
]


class ConfigError(ValueError):
    """A bad training configuration; the message names the offending key."""


_SECTIONS: dict[str, type] = {
    "teacher": TeacherConfig,
    "student": StudentConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "ema": EMAConfig,
    "eval": EvalConfig,
    "distributed": DistributedConfig,
}


@dataclass
class TrainConfig:
    """The whole training run. See the module docstring for the file layout.

    Top-level keys: ``name`` (of the run, in the progress bar and the console lines), ``seed``,
    ``max_iters``, ``out_dir`` (checkpoints, log.jsonl, tensorboard), ``device`` ("auto", "cpu",
    "cuda", "cuda:1"), ``mixed_precision`` ("auto": bf16 autocast on CUDA only; "bf16"; "no"),
    ``log_every``, ``eval_every`` and ``ckpt_every`` (iterations; 0 disables), ``final_checkpoint``
    (also checkpoint when training ends), ``keep_checkpoints``, ``progress`` (tqdm bar),
    ``tensorboard`` (when installed).
    """

    name: str = "pi-ID"
    seed: int = 0
    max_iters: int = 1000
    out_dir: str = "runs/distill"
    device: str = "auto"
    mixed_precision: str = "auto"
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    final_checkpoint: bool = True
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = True
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    piid: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.piid is None:
            self.piid = PiIDConfig()
        elif isinstance(self.piid, Mapping):
            self.piid = _build_piid(self.piid)
        validate(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config from nested mappings (the parsed TOML / JSON)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
        kwargs = _check_fields(cls, data, "", skip=("piid", *_SECTIONS))
        for name, section_cls in _SECTIONS.items():
            if name in data:
                section = data[name]
                if not isinstance(section, Mapping):
                    raise ConfigError(f"[{name}] must be a table of keys, got {type(section).__name__}")
                kwargs[name] = section_cls(**_check_fields(section_cls, section, f"{name}."))
        if "piid" in data:
            if not isinstance(data["piid"], Mapping):
                raise ConfigError(f"[piid] must be a table of keys, got {type(data['piid']).__name__}")
            kwargs["piid"] = _build_piid(data["piid"])
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load a ``.toml`` or ``.json`` file."""
        return cls.from_dict(load_config_file(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-serialisable); ``from_dict(to_dict())`` round-trips."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with top-level fields or whole sections replaced.

        Sections may be given as mappings of the keys to change: ``cfg.replace(optim={"lr": 1e-3})``.
        """
        data = self.to_dict()
        for key, value in changes.items():
            if isinstance(value, Mapping) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            elif dataclasses.is_dataclass(value):
                data[key] = dataclasses.asdict(value)
            else:
                data[key] = value
        return TrainConfig.from_dict(data)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (tomllib on Python 3.11+, tomli before) or JSON file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON: {err}") from None
    elif suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ModuleNotFoundError("reading TOML configs on Python < 3.11 needs the tomli package") from None
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
    else:
        raise ConfigError(f"config file must end in .toml or .json, got {path.name!r}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys")
    return data


# ---------------------------------------------------------------------------------------------- helpers


def _build_piid(section: Mapping[str, Any]) -> PiIDConfig:
    kwargs = _check_fields(PiIDConfig, section, "piid.")
    try:
        return PiIDConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"[piid]: {err}") from None


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """Check ``value`` against a simple annotation; returns (ok, converted value)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, conv = _type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if hint in (list, tuple) or origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return True, list(value) if (hint is list or origin is list) else tuple(value)
        return False, value
    if hint is dict or origin is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    return True, value  # anything else: let the dataclass decide


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return {dict: "table", list: "list", tuple: "list"}.get(hint, getattr(hint, "__name__", str(hint)))


def _check_fields(cls: type, data: Mapping[str, Any], prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Known keys with values of the annotated types, else a ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in names:
            close = [n for n in names if n.lower() == str(key).lower() or n.replace("_", "") == str(key).replace("_", "")]
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        ok, conv = _type_ok(value, hints.get(key, Any))
        if not ok:
            raise ConfigError(
                f"config key {prefix}{key} must be of type {_type_name(hints[key])}, got {type(value).__name__} {value!r}"
            )
        out[key] = conv
    return out


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key} {msg}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _need(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Range and consistency checks across sections; raises ConfigError naming the key."""
    for name, section_cls in _SECTIONS.items():
        _need(isinstance(getattr(cfg, name), section_cls), f"[{name}]", f"must be a {section_cls.__name__}")
    _need(cfg.max_iters >= 0, "max_iters", f"must be >= 0, got {cfg.max_iters}")
    for key in ("log_every", "eval_every", "ckpt_every"):
        _need(getattr(cfg, key) >= 0, key, f"must be >= 0 (0 disables), got {getattr(cfg, key)}")
    _need(cfg.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {cfg.keep_checkpoints}")
    _need(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        f"must be 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}",
    )
    _one_of(cfg.mixed_precision, "mixed_precision", ("auto", "bf16", "no"))

    t = cfg.teacher
    _one_of(t.kind, "teacher.kind", ("exact", "diffusers"))
    _need(t.num_modes >= 1, "teacher.num_modes", f"must be >= 1, got {t.num_modes}")
    _need(t.std > 0 and math.isfinite(t.std), "teacher.std", f"must be a positive float, got {t.std}")
    _need(math.isfinite(t.mode_scale), "teacher.mode_scale", f"must be finite, got {t.mode_scale}")
    if t.kind == "diffusers":
        _need(bool(t.model) != bool(t.pretrained), "teacher.model", "or teacher.pretrained must be given (exactly one)")
    _need(t.guidance_scale >= 0, "teacher.guidance_scale", f"must be >= 0, got {t.guidance_scale}")
    if t.guidance_interval:
        gi = t.guidance_interval
        _need(
            len(gi) == 2 and all(isinstance(v, (int, float)) for v in gi) and gi[0] <= gi[1],
            "teacher.guidance_interval",
            f"must be [low, high] timesteps with low <= high, got {gi!r}",
        )
    if t.guidance_scale != 1.0:
        _need(t.kind == "diffusers", "teacher.guidance_scale", "!= 1 needs teacher.kind = 'diffusers'")
        _need(cfg.data.num_classes > 0, "teacher.guidance_scale", "!= 1 needs data.num_classes > 0 (class-conditional)")

    s = cfg.student
    _one_of(s.kind, "student.kind", ("toy", "diffusers"))
    _need(s.num_components >= 1, "student.num_components", f"must be >= 1, got {s.num_components}")
    _need(s.num_points >= 1, "student.num_points", f"must be >= 1, got {s.num_points}")
    _need(s.hidden >= 1, "student.hidden", f"must be >= 1, got {s.hidden}")
    _need(s.kind == "toy" or t.kind == "diffusers", "student.kind", "'diffusers' needs teacher.kind = 'diffusers'")

    d = cfg.data
    _one_of(d.mode, "data.mode", ("data_dependent", "data_free"))
    _one_of(d.source, "data.source", ("exact", "tensors"))
    if d.mode == "data_dependent" and d.source == "tensors":
        _need(bool(d.path), "data.path", "must name a .safetensors or .pt file when data.source = 'tensors'")
    for key in ("batch_size", "channels", "height", "width"):
        _need(getattr(d, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    _need(d.num_classes >= 0, "data.num_classes", f"must be >= 0, got {d.num_classes}")
    _need(
        d.num_classes == 0 or s.kind == "diffusers",
        "data.num_classes",
        "> 0 (class labels) needs a class-conditional student: student.kind = 'diffusers'",
    )

    o = cfg.optim
    _need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive float, got {o.lr}")
    _need(
        len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
        "optim.betas",
        f"must be two floats in [0, 1), got {o.betas!r}",
    )
    _need(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _need(o.warmup_iters >= 0, "optim.warmup_iters", f"must be >= 0, got {o.warmup_iters}")
    _need(0 < o.warmup_ratio <= 1, "optim.warmup_ratio", f"must lie in (0, 1], got {o.warmup_ratio}")
    _one_of(o.lr_decay, "optim.lr_decay", LR_DECAYS)
    _need(0 <= o.lr_min_ratio <= 1, "optim.lr_min_ratio", f"must lie in [0, 1], got {o.lr_min_ratio}")
    _need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    _need(o.grad_clip_begin_iter >= 0, "optim.grad_clip_begin_iter", f"must be >= 0, got {o.grad_clip_begin_iter}")
    _need(o.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {o.grad_accum}")

    e = cfg.ema
    _need(0 <= e.decay < 1, "ema.decay", f"must lie in [0, 1), got {e.decay}")
    _need(e.start_iter >= 0, "ema.start_iter", f"must be >= 0, got {e.start_iter}")
    _one_of(e.policy, "ema.policy", ("fixed", "karras"))
    _need(e.gamma > 0, "ema.gamma", f"must be > 0, got {e.gamma}")

    v = cfg.eval
    _need(v.num_samples >= 1, "eval.num_samples", f"must be >= 1, got {v.num_samples}")
    _need(v.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {v.batch_size}")
    _need(v.nfe >= 0, "eval.nfe", f"must be >= 0 (0: the pi-ID nfe), got {v.nfe}")

    dist = cfg.distributed
    _one_of(dist.mode, "distributed.mode", ("auto", "none", "ddp", "fsdp"))
    _one_of(dist.backend, "distributed.backend", ("auto", "nccl", "gloo"))
    _need(
        all(isinstance(m, str) for m in dist.fsdp_modules),
        "distributed.fsdp_modules",
        "must be a list of module class names",
    )

    _need(isinstance(cfg.piid, PiIDConfig), "[piid]", "must be a PiIDConfig or a table of its fields")
