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
:class:`ConfigError` naming the key (``data.batch_size``). Numbers may be numpy scalars wherever Python
numbers are accepted (they are stored as Python ints and floats), and every float must be finite
(``optim.eps = inf`` is an error naming ``optim.eps``).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piflow_kernels.checks import count, is_int, is_real, positive_float
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
from piflow_kernels.files import DamagedFileError, read_json, read_toml, require_file

__all__ = [
    "ConfigError",
    "ConfigFileError",
    "TrainConfig",
    "TeacherConfig",
    "StudentConfig",
    "DataConfig",
    "OptimConfig",
    "EMAConfig",
    "EvalConfig",
    "DistributedConfig",
    "load_config_file",
    "RESUME_FREE_KEYS",
    "run_changes",
]


class ConfigError(ValueError):
    """A bad training configuration; the message names the offending key."""


class ConfigFileError(ConfigError, DamagedFileError):
    """A config file that cannot be parsed (not UTF-8, invalid TOML / JSON, empty); ``.path`` names it."""


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
    ``tensorboard`` ("auto": TensorBoard logs when the tensorboard package is installed, silently none
    otherwise; true: the same, with one warning when it is missing; false: none),
    ``allow_config_change`` (resume a checkpoint whose saved config differs in keys that change the run,
    with a warning, instead of refusing; the command line's ``--force-resume``), ``save_student`` (a
    diffusers student also writes its EMA weights as a ``PiFlowStudent.save_pretrained`` folder,
    ``<checkpoint>/student``, at every checkpoint, recording the sampling settings of ``[piid]``).
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
    tensorboard: bool | str = "auto"
    allow_config_change: bool = False
    save_student: bool = True
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
    """Parse a TOML (tomllib on Python 3.11+, tomli before) or JSON file into a dict.

    A missing file is a ``FileNotFoundError``, a directory an ``IsADirectoryError``; a file that is not
    UTF-8, not valid TOML / JSON or empty is a :class:`ConfigFileError` (a ConfigError and a
    :class:`~piflow_kernels.files.DamagedFileError`), all naming the path.
    """
    path = require_file(path, "training config")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(f"config file must end in .toml or .json, got {path.name!r}")
    try:
        data = read_json(path, "training config") if suffix == ".json" else read_toml(path, "training config")
    except DamagedFileError as err:
        raise ConfigFileError(*err.args) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys")
    return data


# ---------------------------------------------------------------------------------------------- helpers


def _build_piid(section: Mapping[str, Any]) -> PiIDConfig:
    kwargs = _check_fields(PiIDConfig, section, "piid.")
    try:
        return PiIDConfig(**kwargs)
    except (ValueError, TypeError) as err:
        # PiIDConfig names its fields "PiIDConfig.shift": in a config file the key is piid.shift
        raise ConfigError(f"[piid]: {str(err).replace('PiIDConfig.', 'config key piid.')}") from None


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
        return (True, int(value)) if is_int(value) else (False, value)
    if hint is float:
        # any real (numpy scalars too; inf and NaN as well: validate() names the key of a non-finite value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
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


def _checked(check: Any, key: str, value: Any, *args: Any) -> Any:
    """``check(key, value, *args)`` of :mod:`piflow_kernels.checks`, its TypeError / ValueError as a ConfigError."""
    try:
        return check(key, value, *args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key {err}") from None


def _plain_numbers(obj: Any, prefix: str) -> None:
    """Every int and float field of the dataclass ``obj`` as a Python int / finite float (numpy scalars accepted),
    else a ConfigError naming the key: a config built in code gets the checks ``from_dict`` makes."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value, hint = prefix + f.name, getattr(obj, f.name), hints.get(f.name)
        if hint is int:
            _need(is_int(value), key, f"must be of type int, got {type(value).__name__} {value!r}")
            setattr(obj, f.name, int(value))
        elif hint is float:
            _need(is_real(value), key, f"must be a finite number, got {value!r}")
            setattr(obj, f.name, float(value))


def _real_list(values: Any, key: str, length: int, what: str) -> list[float]:
    """``length`` finite reals (numpy scalars accepted) as Python floats, else a ConfigError naming the key."""
    ok = isinstance(values, (list, tuple)) and len(values) == length and all(is_real(v) for v in values)
    _need(ok, key, f"must be {what}, got {values!r}")
    return [float(v) for v in values]


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("float32", "bfloat16", "float16")


def validate(cfg: TrainConfig) -> None:
    """Range and consistency checks across sections; raises ConfigError naming the key."""
    for name, section_cls in _SECTIONS.items():
        _need(isinstance(getattr(cfg, name), section_cls), f"[{name}]", f"must be a {section_cls.__name__}")
    _plain_numbers(cfg, "")
    for name in _SECTIONS:
        _plain_numbers(getattr(cfg, name), f"{name}.")
    _checked(count, "max_iters", cfg.max_iters, 0)
    for key in ("log_every", "eval_every", "ckpt_every"):
        _need(getattr(cfg, key) >= 0, key, f"must be >= 0 (0 disables), got {getattr(cfg, key)}")
    _checked(count, "keep_checkpoints", cfg.keep_checkpoints, 1)
    _need(
        isinstance(cfg.device, str) and _DEVICE.fullmatch(cfg.device) is not None,
        "device",
        f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}",
    )
    _one_of(cfg.mixed_precision, "mixed_precision", ("auto", "bf16", "no"))
    _need(
        isinstance(cfg.tensorboard, bool) or cfg.tensorboard == "auto",
        "tensorboard",
        f"must be true, false or 'auto', got {cfg.tensorboard!r}",
    )
    for key in ("final_checkpoint", "progress", "allow_config_change", "save_student"):
        _need(isinstance(getattr(cfg, key), bool), key, f"must be true or false, got {getattr(cfg, key)!r}")

    t = cfg.teacher
    _one_of(t.kind, "teacher.kind", ("exact", "diffusers"))
    _checked(count, "teacher.num_modes", t.num_modes, 1)
    _checked(positive_float, "teacher.std", t.std)
    if t.kind == "diffusers":
        _need(bool(t.model) != bool(t.pretrained), "teacher.model", "or teacher.pretrained must be given (exactly one)")
    _need(t.guidance_scale >= 0, "teacher.guidance_scale", f"must be >= 0, got {t.guidance_scale}")
    if t.guidance_interval:
        what = "[low, high] timesteps (finite, low <= high)"
        gi = t.guidance_interval = _real_list(t.guidance_interval, "teacher.guidance_interval", 2, what)
        _need(gi[0] <= gi[1], "teacher.guidance_interval", f"must be {what}, got {gi!r}")
    if t.guidance_scale != 1.0:
        _need(t.kind == "diffusers", "teacher.guidance_scale", "!= 1 needs teacher.kind = 'diffusers'")
        _need(
            cfg.data.num_classes > 0 or bool(cfg.data.prompt_cache),
            "teacher.guidance_scale",
            "!= 1 needs data.num_classes > 0 (class-conditional) or data.prompt_cache (negative prompt embeddings)",
        )
    _one_of(t.dtype, "teacher.dtype", DTYPES)
    _one_of(t.prediction_type, "teacher.prediction_type", ("auto", "velocity", "neg_velocity", "x0", "eps"))
    _one_of(t.timestep_convention, "teacher.timestep_convention", ("auto", "sigma", "timestep", "reversed"))
    eg = t.embedded_guidance
    _need(eg >= 0, "teacher.embedded_guidance", f"must be >= 0 (0: the model's default), got {eg}")
    _need(0 <= t.orthogonal_guidance <= 1, "teacher.orthogonal_guidance", f"must lie in [0, 1], got {t.orthogonal_guidance}")
    if t.orthogonal_guidance:
        cfg_needed = "needs classifier-free guidance (teacher.guidance_scale != 1)"
        _need(t.guidance_scale != 1.0, "teacher.orthogonal_guidance", cfg_needed)

    s = cfg.student
    _one_of(s.kind, "student.kind", ("toy", "diffusers"))
    for key in ("num_components", "num_points", "hidden"):
        _checked(count, f"student.{key}", getattr(s, key), 1)
    _need(s.kind == "toy" or t.kind == "diffusers", "student.kind", "'diffusers' needs teacher.kind = 'diffusers'")
    _checked(count, "student.lora_rank", s.lora_rank, 0)
    _need(s.lora_alpha >= 0, "student.lora_alpha", f"must be >= 0 (0: the rank), got {s.lora_alpha}")
    _need(0 <= s.lora_dropout < 1, "student.lora_dropout", f"must lie in [0, 1), got {s.lora_dropout}")
    for key in ("lora_target_modules", "train_modules"):
        names = getattr(s, key)
        _need(all(isinstance(m, str) and m for m in names), f"student.{key}", f"must be a list of module names, got {names!r}")
    if s.lora_rank:
        _need(s.kind == "diffusers", "student.lora_rank", "> 0 needs student.kind = 'diffusers' (LoRA on the teacher's trunk)")
        _need(not s.init_from, "student.lora_rank", "> 0 cannot start from student.init_from (a full student folder)")
    elif s.lora_target_modules:
        raise ConfigError("config key student.lora_target_modules needs student.lora_rank > 0")
    for key in ("tie_teacher", "gradient_checkpointing"):
        _need(isinstance(getattr(s, key), bool), f"student.{key}", f"must be true or false, got {getattr(s, key)!r}")
    _one_of(s.trainable_dtype, "student.trainable_dtype", DTYPES)

    d = cfg.data
    _one_of(d.mode, "data.mode", ("data_dependent", "data_free"))
    _one_of(d.source, "data.source", ("exact", "tensors", "latents"))
    if d.mode == "data_dependent" and d.source == "tensors":
        _need(bool(d.path), "data.path", "must name a .safetensors or .pt file when data.source = 'tensors'")
    if d.mode == "data_dependent" and d.source == "latents":
        _need(bool(d.path), "data.path", "must name a latent cache folder (encode-images) when data.source = 'latents'")
    for key in ("batch_size", "channels", "height", "width"):
        _checked(count, f"data.{key}", getattr(d, key), 1)
    _checked(count, "data.num_classes", d.num_classes, 0)
    _checked(count, "data.frames", d.frames, 0)
    _need(d.frames == 0 or d.mode == "data_free", "data.frames", "> 0 (video latents) needs data.mode = 'data_free'")
    _need(
        d.num_classes == 0 or s.kind == "diffusers",
        "data.num_classes",
        "> 0 (class labels) needs a class-conditional student: student.kind = 'diffusers'",
    )

    if d.prompt_cache:
        _need(t.kind == "diffusers" and s.kind == "diffusers", "data.prompt_cache",
              "needs a diffusers teacher and student (teacher.kind = student.kind = 'diffusers')")  # fmt: skip
        _need(d.num_classes == 0, "data.prompt_cache", "and data.num_classes > 0 cannot be combined (text or class labels)")

    o = cfg.optim
    _one_of(o.optimizer, "optim.optimizer", ("adamw", "adamw8bit"))
    _checked(positive_float, "optim.lr", o.lr)
    o.betas = _real_list(o.betas, "optim.betas", 2, "two floats in [0, 1)")
    _need(all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two floats in [0, 1), got {o.betas!r}")
    _checked(positive_float, "optim.eps", o.eps)
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _checked(count, "optim.warmup_iters", o.warmup_iters, 0)
    _need(0 < o.warmup_ratio <= 1, "optim.warmup_ratio", f"must lie in (0, 1], got {o.warmup_ratio}")
    _one_of(o.lr_decay, "optim.lr_decay", LR_DECAYS)
    _need(0 <= o.lr_min_ratio <= 1, "optim.lr_min_ratio", f"must lie in [0, 1], got {o.lr_min_ratio}")
    _need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    _checked(count, "optim.grad_clip_begin_iter", o.grad_clip_begin_iter, 0)
    _checked(count, "optim.grad_accum", o.grad_accum, 1)
    _checked(count, "optim.max_nonfinite_steps", o.max_nonfinite_steps, 0)

    e = cfg.ema
    _need(0 <= e.decay < 1, "ema.decay", f"must lie in [0, 1), got {e.decay}")
    _checked(count, "ema.start_iter", e.start_iter, 0)
    _one_of(e.policy, "ema.policy", ("fixed", "karras"))
    _checked(positive_float, "ema.gamma", e.gamma)

    v = cfg.eval
    _checked(count, "eval.num_samples", v.num_samples, 1)
    _checked(count, "eval.batch_size", v.batch_size, 1)
    _need(v.nfe >= 0, "eval.nfe", f"must be >= 0 (0: the pi-ID nfe), got {v.nfe}")
    _checked(count, "eval.num_prompts", v.num_prompts, 1)
    _checked(count, "eval.teacher_steps", v.teacher_steps, 0)

    dist = cfg.distributed
    _one_of(dist.mode, "distributed.mode", ("auto", "none", "ddp", "fsdp"))
    _one_of(dist.backend, "distributed.backend", ("auto", "nccl", "gloo"))
    _need(
        all(isinstance(m, str) for m in dist.fsdp_modules),
        "distributed.fsdp_modules",
        "must be a list of module class names",
    )

    _need(isinstance(cfg.piid, PiIDConfig), "[piid]", "must be a PiIDConfig or a table of its fields")


# ---------------------------------------------------------------------------------------------- resuming

# Keys a resumed run may change freely: how long it runs, where and how it logs, where and how it computes
# (device, precision, backend, process layout), evaluation, and the guards. A key ending in "." is a section.
# Every other key changes what is trained (models, data, loss, optimisation, seed).
RESUME_FREE_KEYS = (
    "name", "max_iters", "out_dir", "device", "mixed_precision", "log_every", "eval_every", "ckpt_every",
    "final_checkpoint", "keep_checkpoints", "progress", "tensorboard", "allow_config_change", "save_student",
    "optim.max_nonfinite_steps", "piid.backend", "eval.", "distributed.",
)  # fmt: skip


def _section_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict as {"seed": ..., "optim.lr": ...}; table values (teacher.model, student.kwargs) stay whole."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if (key in _SECTIONS or key == "piid") and isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def run_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that changes the run (not in :data:`RESUME_FREE_KEYS`)
    and differs between two ``TrainConfig.to_dict()`` dicts. Keys known to one side only (added or retired
    between versions) are not compared."""
    old, new = _section_keys(saved), _section_keys(current)
    changes = []
    for key in sorted(old.keys() & new.keys()):
        if key in RESUME_FREE_KEYS or any(p.endswith(".") and key.startswith(p) for p in RESUME_FREE_KEYS):
            continue
        if old[key] != new[key]:
            changes.append((key, old[key], new[key]))
    return changes
