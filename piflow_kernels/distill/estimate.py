"""Will a distillation config fit? A per-rank GPU memory estimate from the config alone, before any weight is read.

    >>> est = estimate_memory(TrainConfig.from_file("flux_lora.toml"), world_size=8)
    >>> est.trainable_params, est.ddp.peak, est.fsdp.peak      # exact count, estimated bytes per rank
    >>> print(est.table())

``python -m piflow_kernels distill CONFIG --dry-run [--world-size N] [--text-len L]`` prints :meth:`MemoryEstimate.table`.

The teacher and the student are built as the trainer builds them (:func:`~.builders.build_training_student`,
:func:`~.lora.add_lora`), but on the ``meta`` device from the teacher's ``config.json`` (or ``teacher.model``): no
weight file is opened, and the parameter counts, dtypes and bytes are exact. What the trainer then holds on each
rank follows from them:

- weights: the frozen base once (a LoRA student with ``student.tie_teacher`` runs its own base as the teacher), else
  the teacher and the student each; the EMA copies the trained parameters only (it shares frozen ones, see
  :mod:`.ema`); gradients of the trained parameters; DDP's gradient buckets (a second copy of the gradients: the
  trainer wraps with DDP's default ``gradient_as_bucket_view=False``); AdamW's two moments in the parameter dtype,
  or bitsandbytes' 8-bit AdamW (:data:`BNB_BLOCK`). These are exact given the trainer's code.
- FSDP2: the student and the EMA module are sharded over the ranks (each module holds its own shards, so the frozen
  base is there twice, a ``1/world_size`` each); the units of ``distributed.fsdp_modules`` are gathered one at a
  time (plus the prefetched next one; all of them with ``fsdp_reshard_after_forward = false``), the root stays
  gathered from forward to backward; a separate teacher is not sharded; 8-bit AdamW falls back to AdamW (see
  :mod:`.optim`). Before sharding, the trainer moves the whole student to each rank: the start-up peak.
- activations: an estimate, :data:`ACTIVATION_MODELS` (a rough model per transformer block, calibrated on the CPU,
  see ``docs/distill_text.md``), plus :data:`CUDA_CONTEXT_BYTES` and :data:`FRAGMENTATION` for the allocator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from piflow_kernels.distill.config import ConfigError, TrainConfig

__all__ = [
    "ACTIVATION_MODELS",
    "ActivationModel",
    "MemoryEstimate",
    "MemoryRow",
    "RankMemory",
    "estimate_memory",
    "meta_models",
]

GiB = 2**30

# the rows of a per-rank estimate, in this order (RankMemory.rows; rank["activations saved"] reads one)
FROZEN, TRAINED, EMA_ROW, GRADS = "frozen weights", "trained weights", "EMA of the trained weights", "gradients"
BUFFERS, OPTIM = "DDP buckets | FSDP gathered", "optimizer state"
SAVED, WORKING, OVERHEAD = "activations saved", "activations working set", "CUDA context + allocator"


@dataclass(frozen=True)
class ActivationModel:
    """Bytes per (sample, token, hidden unit) of one transformer block: ``bytes = constant * B * tokens * hidden``.

    ``saved``: what a block's forward keeps for its backward (no checkpointing); ``block_input``: what a checkpointed
    block keeps (its input hidden states); ``backward``: the working set of one block's backward on top of the saved
    activations; ``checkpointed``: the working set of a checkpointed block's recomputed forward and its backward;
    ``no_grad``: the working set of one block's forward without grad (the teacher, evaluation).
    """

    saved: float
    block_input: float
    backward: float
    checkpointed: float
    no_grad: float


#: measured on the CPU with tiny random FLUX students (2 heads of 64; 256 image + 8 to 64 text tokens; LoRA rank 8 and
#: full fine-tuning; 1-2 double and 1-2 single blocks): the increment per block of the live bytes in the profiler's
#: allocator timeline after a forward, and the peak of a real ``Trainer.accumulate_gradients`` above it; see
#: docs/distill_text.md. "2 bytes": bf16 / fp16 autocast (the trainer on CUDA): 67 B measured for a block's saved
#: tensors, 72 B taken (CUDA's autocast keeps the layer norms' outputs in float32, the CPU's in bf16: about two more
#: tensors of 4 B); "4 bytes": float32 throughout (``mixed_precision = "no"`` with float32 weights): 105 B measured.
ACTIVATION_MODELS: dict[int, ActivationModel] = {
    2: ActivationModel(saved=72.0, block_input=2.0, backward=60.0, checkpointed=64.0, no_grad=48.0),
    4: ActivationModel(saved=105.0, block_input=4.0, backward=52.0, checkpointed=80.0, no_grad=30.0),
}

#: CUDA context, cuBLAS / NCCL workspaces: a fixed share per rank (an estimate)
CUDA_CONTEXT_BYTES = 1 * GiB
#: the caching allocator's fragmentation, as a fraction of the memory that comes and goes every step (activations,
#: the working sets, FSDP's gathered units): an estimate
FRAGMENTATION = 0.10
#: bitsandbytes' blockwise 8-bit optimizer state: one float32 absmax per block of this many elements per moment
#: (bitsandbytes >= 0.44; earlier versions used 2048), and float32 moments for tensors below BNB_MIN_8BIT_SIZE
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096

#: text tokens when no prompt cache says (``--text-len`` overrides): each pipeline's default prompt length
#: (``max_sequence_length``: 512 for FLUX.1, FLUX.2 and Wan; SD3: 77 CLIP tokens + 256 T5 tokens; Qwen-Image: its
#: longest, prompts are usually shorter), one for every text teacher of :data:`piflow_kernels.layouts.TEXT_ARGS`
#: (512 for one added there without an entry here), none for class-conditional ones
DEFAULT_TEXT_LEN = {
    "FluxTransformer2DModel": 512,
    "Flux2Transformer2DModel": 512,
    "SD3Transformer2DModel": 77 + 256,
    "QwenImageTransformer2DModel": 1024,
    "WanTransformer3DModel": 512,
}


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MemoryRow:
    """One line of a per-rank estimate: ``bytes`` and whether it is exact (from the parameters) or an estimate."""

    name: str
    bytes: int
    exact: bool
    note: str = ""


@dataclass(frozen=True)
class RankMemory:
    """Per-rank memory of one parallel layout ("DDP" or "FSDP"); ``peak`` is the sum of ``rows`` (an estimate)."""

    layout: str
    rows: tuple[MemoryRow, ...]
    startup: int = 0  # the peak while the trainer builds and shards the models (FSDP), 0 when below ``peak``
    eval_peak: int = 0  # the peak of a periodic evaluation (``eval_every`` > 0), 0 without one

    @property
    def peak(self) -> int:
        return sum(r.bytes for r in self.rows)

    def row(self, name: str) -> MemoryRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __getitem__(self, name: str) -> int:
        return self.row(name).bytes

    @property
    def worst(self) -> int:
        """The largest of the training peak, the start-up peak and the evaluation peak."""
        return max(self.peak, self.startup, self.eval_peak)


@dataclass(frozen=True)
class MemoryEstimate:
    """What :func:`estimate_memory` finds; counts and bytes of parameters are exact, ``ddp`` / ``fsdp`` per rank.

    ``bytes_by_dtype`` maps "trained" / "frozen" to {dtype name: bytes}; "frozen" includes a separate teacher
    (``teacher_params`` of the frozen count) and the tied teacher's own output layer.
    """

    teacher_class: str
    student_kind: str
    world_size: int
    batch_size: int
    total_params: int
    trainable_params: int
    frozen_params: int
    teacher_params: int
    bytes_by_dtype: dict[str, dict[str, int]]
    buffer_bytes: int
    ddp: RankMemory
    fsdp: RankMemory
    image_tokens: int = 0
    text_tokens: int = 0
    text_source: str = ""
    hidden: int = 0
    num_blocks: int = 0
    activation_bytes: int = 0  # the activation dtype's size (2: bf16 / fp16 autocast, 4: float32)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def trainable_bytes(self) -> int:
        return sum(self.bytes_by_dtype["trained"].values())

    @property
    def frozen_bytes(self) -> int:
        return sum(self.bytes_by_dtype["frozen"].values())

    def table(self) -> str:
        """The readable report ``--dry-run`` prints."""
        return _table(self)


# ---------------------------------------------------------------------------- the models on the meta device


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' info / warning lines (a cast with ``.to(dtype)``, peft notices) off while building on meta."""
    try:
        from diffusers.utils import logging as dlog
    except ImportError:  # pragma: no cover - diffusers is a dependency of diffusers teachers
        yield
        return
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _meta_teacher(cfg: TrainConfig) -> nn.Module:
    """The teacher's diffusers model on the meta device, in ``teacher.dtype``, as ``builders._diffusers_model`` makes
    it, from its ``config.json`` (``from_config``: no weight file is opened) or ``teacher.model``."""
    import diffusers

    from piflow_kernels.distill import builders
    from piflow_kernels.files import read_json

    t, d = cfg.teacher, cfg.data
    name = builders.teacher_class_of(cfg)
    model_cls = getattr(diffusers, name, None)
    if model_cls is None or not isinstance(model_cls, type):
        raise ConfigError(f"config key teacher.model_class: diffusers has no model class {name!r}")
    dtype = getattr(torch, t.dtype)
    with torch.device("meta"), _quiet_diffusers():
        if t.pretrained:
            folder = builders.teacher_folder(cfg)
            model = model_cls.from_config(read_json(folder / "config.json", "teacher config"))
        else:
            try:
                model = model_cls(**t.model)
            except TypeError as err:
                raise ConfigError(f"config key teacher.model: {name}(**model) failed: {err}") from None
        model = model.to(dtype)
        keep = getattr(model_cls, "_keep_in_fp32_modules", None) or []
        if t.pretrained and keep and dtype != torch.float32:  # from_pretrained(torch_dtype=...) keeps these in float32
            for pname, p in model.named_parameters():
                if any(k in pname.split(".") for k in keep):
                    p.data = p.data.to(torch.float32)
    # the trainer's checks of the teacher against [data] (builders._diffusers_model)
    conf = model.config
    in_ch = builders._latent_channels(name, conf)
    if in_ch is not None and in_ch != d.channels:
        raise ConfigError(f"config key data.channels = {d.channels} but the teacher takes {in_ch} latent channels")
    size = getattr(conf, "sample_size", None)
    if size is not None and name in builders._FIXED_SIZE and builders._sample_size(size) != (d.height, d.width):
        raise ConfigError(
            f"config keys data.height, data.width = ({d.height}, {d.width}) but the teacher's sample_size is {size}"
        )
    return model.eval().requires_grad_(False)


def _meta_student_from_folder(cfg: TrainConfig) -> nn.Module:
    """``student.init_from`` on the meta device: :class:`PiFlowStudent` rebuilt from its ``config.json`` alone.

    ``build_training_student`` would call ``from_pretrained``, which reads the weights; what it does next for a
    folder student (every parameter trained, cast to ``student.trainable_dtype``, checkpointing) is repeated here.
    """
    from piflow_kernels.files import read_json
    from piflow_kernels.students import PiFlowStudent

    s = cfg.student
    config = read_json(os.path.join(s.init_from, "config.json"), "student config")
    with torch.device("meta"), _quiet_diffusers():
        student = PiFlowStudent.from_config(config)
    student.requires_grad_(True)
    dtype = getattr(torch, s.trainable_dtype)
    for p in student.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    if s.gradient_checkpointing:
        student.trunk.enable_gradient_checkpointing()
    return student


def meta_models(cfg: TrainConfig) -> tuple[nn.Module | None, nn.Module]:
    """(the separate teacher or None, the student) on the meta device, built as the trainer builds them.

    The teacher is None for the exact teacher (no parameters) and for a LoRA student with ``student.tie_teacher``
    (its trunk *is* the teacher's model). Raises :class:`ConfigError` for what the trainer would refuse at build time.
    """
    from piflow_kernels.distill.builders import build_training_student, embedded_guidance

    s = cfg.student
    teacher = _meta_teacher(cfg) if cfg.teacher.kind == "diffusers" else None
    if teacher is not None:
        embedded_guidance(cfg, teacher)  # a guidance value for a model without that input is refused
    tie = s.lora_rank > 0 and s.tie_teacher
    if s.kind == "diffusers" and s.init_from:
        student = _meta_student_from_folder(cfg)
    else:
        # build_training_student works on meta as it is: the head is initialised with copy_ / init_ (no-ops on meta),
        # peft creates the adapters on the device of the base layers, and .to(dtype) casts meta tensors
        with torch.device("meta"), _quiet_diffusers():
            student = build_training_student(cfg, teacher)
    return (None if tie else teacher), student


# ---------------------------------------------------------------------------- counting


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bnb_state_bytes(numel: int) -> int:
    """bitsandbytes AdamW8bit state of one tensor: two uint8 moments plus a float32 absmax per block of each, or
    two float32 moments below its ``min_8bit_size``."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)


@dataclass
class _Counts:
    trained: int = 0
    frozen: int = 0
    teacher: int = 0
    by_dtype: dict[str, dict[str, int]] = field(default_factory=lambda: {"trained": {}, "frozen": {}})
    trained_tensors: int = 0
    buffers: int = 0
    ema_buffers: int = 0
    adamw_state: int = 0
    bnb_state: int = 0

    def bytes(self, group: str) -> int:
        return sum(self.by_dtype[group].values())


def _count(student: nn.Module, teacher: nn.Module | None) -> _Counts:
    c = _Counts()
    seen: set[int] = set()
    for module, is_teacher in ((student, False), (teacher, True)):
        if module is None:
            continue
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n, b = p.numel(), p.numel() * p.element_size()
            group = "trained" if p.requires_grad else "frozen"
            by = c.by_dtype[group]
            by[_dtype_name(p.dtype)] = by.get(_dtype_name(p.dtype), 0) + b
            if p.requires_grad:
                c.trained += n
                c.trained_tensors += 1
                c.adamw_state += 2 * b + 4  # exp_avg, exp_avg_sq (zeros_like: the parameter's dtype) and a step
                c.bnb_state += _bnb_state_bytes(n)
            else:
                c.frozen += n
                c.teacher += n if is_teacher else 0
        for buf in module.buffers():
            if id(buf) not in seen:
                seen.add(id(buf))
                c.buffers += buf.numel() * buf.element_size()
                c.ema_buffers += 0 if is_teacher else buf.numel() * buf.element_size()
    return c


def _fsdp_units(student: nn.Module, class_names: list[str]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """([(bytes, trained bytes)] of each FSDP unit, (bytes, trained bytes) of the root): every parameter belongs to
    the innermost module of a class in ``class_names`` holding it, else to the root."""
    units = [m for m in student.modules() if m is not student and type(m).__name__ in set(class_names)]
    owner: dict[int, int] = {}
    for i, m in enumerate(units):  # pre-order: an inner unit comes after its outer one and takes its parameters
        for p in m.parameters():
            owner[id(p)] = i
    sizes = [[0, 0] for _ in units]
    root = [0, 0]
    for p in {id(p): p for p in student.parameters()}.values():
        b = p.numel() * p.element_size()
        slot = sizes[owner[id(p)]] if id(p) in owner else root
        slot[0] += b
        slot[1] += b if p.requires_grad else 0
    return [tuple(s) for s in sizes], tuple(root)


def _block_lists(trunk: nn.Module) -> list[nn.ModuleList]:
    """The trunk's lists of transformer blocks (``transformer_blocks``, ``single_transformer_blocks``, ...)."""
    return [m for name, m in trunk.named_children() if isinstance(m, nn.ModuleList) and name.endswith("blocks")]


# ---------------------------------------------------------------------------- tokens and the activation model


def _text_tokens(cfg: TrainConfig, teacher_class: str, text_len: int | None) -> tuple[int, str]:
    """Text tokens per sample and where the number comes from."""
    if text_len is not None:
        return int(text_len), "--text-len"
    if cfg.data.prompt_cache:
        from piflow_kernels.distill.data import build_prompt_source
        from piflow_kernels.layouts import TEXT_ARGS

        source = build_prompt_source(cfg, teacher_class)  # the trainer's checks of the cache against the teacher
        index = source.cache.index
        name = next(n for n, arg in TEXT_ARGS[teacher_class].items() if arg == "encoder_hidden_states")
        lengths = [shard["tensors"].get(name, {}).get("shape", [None])[0] for shard in index.get("shards", [])]
        known = [n for n in lengths if isinstance(n, int)]
        if known and len(known) == len(lengths):
            return max(known), f"the prompt cache's index ({name} shapes)"
        msl = index.get("settings", {}).get("max_sequence_length")
        if isinstance(msl, int):  # prompts of their own lengths (Qwen-Image): the longest the cache allows
            return msl, "the prompt cache's max_sequence_length (prompts of varying length)"
    from piflow_kernels.layouts import TEXT_ARGS

    default = DEFAULT_TEXT_LEN.get(teacher_class, 512 if teacher_class in TEXT_ARGS else 0)
    return default, ("the pipeline's default prompt length (--text-len to change)" if default else "no text")


@dataclass(frozen=True)
class _Geometry:
    blocks: list[tuple[int, int]]  # (tokens, width) per block, per sample
    image_tokens: int
    text_tokens: int
    hidden: int
    head_width: int  # policy-head outputs per image token


def _geometry(cfg: TrainConfig, student: nn.Module, text_tokens: int) -> _Geometry | None:
    """Tokens and widths of the student's blocks; None for a student the activation model does not cover (toy)."""
    from piflow_kernels.layouts import TEXT_ARGS, geometry

    trunk = getattr(student, "trunk", None)
    if trunk is None:
        return None
    name = student.teacher_class
    conf = trunk.config
    d = cfg.data
    _, _, p = geometry(name, conf)
    k = student.num_components
    c = student.latent_channels
    head_width = (k * c + (k if student.policy_type == "GMFlow" else 0)) * p * p
    if name == "UNet2DModel":
        # resolution levels: H*W / 4^i pixels of block_out_channels[i] channels; per level the down path's
        # layers_per_block resnets, the up path's layers_per_block + 1, the mid block's two at the lowest level
        chans = list(conf.block_out_channels)
        lpb = int(conf.layers_per_block)
        blocks = []
        for i, ch in enumerate(chans):
            pixels = max(1, (d.height * d.width) // 4**i)
            blocks += [(pixels, ch)] * (2 * lpb + 1)
        blocks += [(max(1, (d.height * d.width) // 4 ** (len(chans) - 1)), chans[-1])] * 2
        return _Geometry(blocks, d.height * d.width, 0, max(chans), head_width)
    hidden = int(conf.num_attention_heads) * int(conf.attention_head_dim)
    image = (d.height // p) * (d.width // p)
    text = text_tokens if name in TEXT_ARGS else 0
    n = sum(len(lst) for lst in _block_lists(trunk))
    return _Geometry([(image + text, hidden)] * n, image, text, hidden, head_width)


def _activation_bytes(cfg: TrainConfig) -> int:
    """2 when the trainer runs under bf16 / fp16 autocast (on CUDA by default; with 2-byte weights anywhere), else 4."""
    mp = cfg.mixed_precision
    cuda = cfg.device != "cpu"  # "auto" is taken to mean a GPU: the estimate is for GPUs
    if cuda and mp in ("auto", "bf16"):
        return 2
    if cfg.teacher.kind == "diffusers" and cfg.teacher.dtype != "float32" and mp != "no":
        return 2
    return 4


@dataclass(frozen=True)
class _Activations:
    saved: int  # kept for the backward over the whole forward
    working: int  # on top, at the worst moment of a step (a block's backward, recomputed when checkpointed)
    no_grad_per_sample: int  # one no-grad block forward per sample (evaluation)
    text: str


def _activations(cfg: TrainConfig, geo: _Geometry | None, checkpointing: bool, act: int) -> _Activations:
    m = ACTIVATION_MODELS[act]
    b = cfg.data.batch_size
    if geo is None:
        return _Activations(0, 0, 0, "not modelled for toy students (small MLPs)")
    per_block = [tok * width for tok, width in geo.blocks]  # per sample
    biggest = max(per_block, default=0)
    # outside the blocks: the embedders' outputs and the output norm (~4 hidden-state tensors), the head's output and
    # the policy tensors of the pi-ID loss (the head output in float32, its log-softmax and one velocity per
    # intermediate state)
    states = getattr(cfg.piid, "num_intermediate_states", 2)
    image = geo.image_tokens
    outside = 4 * act * (image + geo.text_tokens) * geo.hidden + (2 + states) * 4 * image * geo.head_width
    if checkpointing:
        saved = b * (sum(per_block) * m.block_input + outside)
        working = b * biggest * m.checkpointed  # one block recomputed, then its backward
        how = f"checkpointed: {m.block_input:g} B block inputs + {m.checkpointed:g} B for one block recomputed and its backward"
    else:
        saved = b * (sum(per_block) * m.saved + outside)
        working = b * biggest * m.backward
        how = f"{m.saved:g} B saved per block + {m.backward:g} B for one block's backward"
    # the teacher's no-grad forward runs while the student's activations are held: the larger working set counts
    working = max(working, b * biggest * m.no_grad)
    return _Activations(int(saved), int(working), int(biggest * m.no_grad), how + " per token per hidden unit")


# ---------------------------------------------------------------------------- the estimate


def _world_size(world_size: int | None) -> int:
    if world_size is None:
        raw = os.environ.get("WORLD_SIZE", "1")
        try:
            world_size = int(raw)
        except ValueError:
            raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return world_size


def estimate_memory(cfg: TrainConfig, world_size: int | None = None, *, text_len: int | None = None) -> MemoryEstimate:
    """Per-rank memory of training ``cfg`` on ``world_size`` ranks (default: ``WORLD_SIZE``, else 1), DDP and FSDP2.

    Nothing is trained and no weight is read: the models are built on the meta device (:func:`meta_models`). Text
    tokens come from ``text_len``, else the prompt cache's index, else the pipeline's default prompt length
    (:data:`DEFAULT_TEXT_LEN`). Raises :class:`ConfigError` (a ``ValueError``) or ``OSError`` for what the trainer
    would refuse before training.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    w = _world_size(world_size)
    if text_len is not None and (isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0):
        raise ValueError(f"text_len must be an integer >= 0, got {text_len!r}")
    teacher, student = meta_models(cfg)
    teacher_class = getattr(student, "teacher_class", type(student).__name__)
    counts = _count(student, teacher)
    trained, frozen = counts.bytes("trained"), counts.bytes("frozen")
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters()) if teacher is not None else 0
    student_frozen = frozen - teacher_bytes
    s, dist, o = cfg.student, cfg.distributed, cfg.optim
    checkpointing = bool(s.gradient_checkpointing) and hasattr(student, "trunk")
    text, text_source = _text_tokens(cfg, teacher_class, text_len) if hasattr(student, "trunk") else (0, "no text")
    geo = _geometry(cfg, student, text)
    act = _activation_bytes(cfg)
    a = _activations(cfg, geo, checkpointing, act)
    notes: list[str] = []

    # ---- DDP: every rank holds everything
    eight_bit = o.optimizer == "adamw8bit" and cfg.device != "cpu"
    if eight_bit and importlib.util.find_spec("bitsandbytes") is None:  # the trainer would fall back to AdamW
        extra = _gib(counts.adamw_state - counts.bnb_state)
        notes.append(f"optim.optimizer = 'adamw8bit' needs bitsandbytes, which this Python lacks: where it is missing the "
                     f"trainer uses AdamW, {extra} more per DDP rank")  # fmt: skip
    opt_ddp = counts.bnb_state if eight_bit else counts.adamw_state
    opt_note = (f"bitsandbytes 8-bit AdamW: 2 x 1 B per element + 2 x 4 B per block of {BNB_BLOCK}" if eight_bit
                else "AdamW: 2 moments in the parameter dtype")  # fmt: skip
    tie = s.lora_rank > 0 and s.tie_teacher
    wrapped = w > 1 or dist.mode == "ddp"
    dynamic = a.saved + a.working
    ddp_rows = (
        MemoryRow(FROZEN, frozen, True, "the teacher and the student's base" if teacher is not None else
                  "held once: the student's base is the teacher" if tie else ""),
        MemoryRow(TRAINED, trained + counts.buffers, True, "with the buffers" if counts.buffers else ""),
        MemoryRow(EMA_ROW, trained + counts.ema_buffers, True, "the EMA shares the frozen weights"),
        MemoryRow(GRADS, trained, True),
        MemoryRow(BUFFERS, trained if wrapped else 0, True,
                  "a second copy of the gradients" if wrapped else "one process: no DDP wrapper"),
        MemoryRow(OPTIM, opt_ddp, True, opt_note),
        MemoryRow(SAVED, a.saved, False, a.text),
        MemoryRow(WORKING, a.working, False, "one block's backward (or the teacher's no-grad forward, if larger)"),
        MemoryRow(OVERHEAD, int(CUDA_CONTEXT_BYTES + FRAGMENTATION * dynamic), False,
                  f"{CUDA_CONTEXT_BYTES / GiB:g} GiB + {FRAGMENTATION:.0%} of the activations"),
    )  # fmt: skip
    static_ddp = sum(r.bytes for r in ddp_rows[:6])

    # ---- FSDP2: student and EMA sharded alike, units gathered one (+ one prefetched) at a time
    fsdp_names = list(dist.fsdp_modules)
    if dist.mode == "fsdp" and not fsdp_names:
        notes.append("distributed.fsdp_modules is empty: the FSDP root is the whole student, gathered during "
                     "forward and backward; name the block classes to shard them one by one")  # fmt: skip
    elif not fsdp_names:  # the FSDP column is a what-if: shard the trunk's blocks, as a FLUX config would name them
        trunk = getattr(student, "trunk", None)
        lists = _block_lists(trunk) if trunk is not None else []
        fsdp_names = sorted({type(b).__name__ for lst in lists for b in lst})
        if fsdp_names:
            notes.append(f"FSDP column: distributed.fsdp_modules = {fsdp_names} assumed")
    units, (root, root_trained) = _fsdp_units(student, fsdp_names)
    missing = sorted(set(fsdp_names) - {type(m).__name__ for m in student.modules()})
    if missing:  # the trainer's wrap_model refuses them under FSDP
        msg = f"distributed.fsdp_modules: no submodule of class {missing} in {type(student).__name__}"
        if dist.mode == "fsdp":
            raise ConfigError(f"config key {msg}")
        notes.append(msg)
    biggest_unit = max((u[0] for u in units), default=0)
    biggest_trained = max((u[1] for u in units), default=0)
    if dist.fsdp_reshard_after_forward:
        gathered = root + 2 * biggest_unit  # the root stays gathered; the current unit and the prefetched next one
    else:
        gathered = root + sum(u[0] for u in units)
    gathered += root_trained + biggest_trained  # unsharded gradients before their reduce-scatter
    sharded_student = -(-(student_frozen + trained) // w)
    opt_fsdp = -(-counts.adamw_state // w)
    fsdp_dynamic = dynamic + gathered
    fsdp_rows = (
        MemoryRow(FROZEN, -(-2 * student_frozen // w) + teacher_bytes, True,
                  "the student's and the EMA's shards (each module holds its own)"
                  + ("; the teacher whole (not sharded)" if teacher is not None else "")),
        MemoryRow(TRAINED, -(-trained // w) + counts.buffers, True),
        MemoryRow(EMA_ROW, -(-trained // w) + counts.ema_buffers, True),
        MemoryRow(GRADS, -(-trained // w), True),
        MemoryRow(BUFFERS, gathered, False, "the root, the current and the prefetched unit, their unsharded gradients"
                  if dist.fsdp_reshard_after_forward else "every unit (fsdp_reshard_after_forward = false)"),
        MemoryRow(OPTIM, opt_fsdp, True, "AdamW: 8-bit AdamW takes no sharded parameters (optim.py falls back)"
                  if o.optimizer == "adamw8bit" else ""),
        MemoryRow(SAVED, a.saved, False),
        MemoryRow(WORKING, a.working, False),
        MemoryRow(OVERHEAD, int(CUDA_CONTEXT_BYTES + FRAGMENTATION * fsdp_dynamic), False,
                  f"{CUDA_CONTEXT_BYTES / GiB:g} GiB + {FRAGMENTATION:.0%} of the activations and gathered units"),
    )  # fmt: skip
    static_fsdp = sum(r.bytes for r in fsdp_rows[:6]) - gathered
    # start-up: the whole student moved to the rank, the EMA's copy of its trained parameters, then the student's
    # shards (its full trained tensors freed) and the EMA's shards while the EMA still holds the full frozen ones
    startup = student_frozen + trained + max(trained, 2 * sharded_student) + teacher_bytes + CUDA_CONTEXT_BYTES

    eval_ddp = eval_fsdp = 0
    if cfg.eval_every > 0 and geo is not None:
        ev = cfg.eval
        count = getattr(ev, "num_prompts", ev.num_samples) if cfg.data.prompt_cache else ev.num_samples
        transient = min(ev.batch_size, count) * a.no_grad_per_sample
        eval_ddp = static_ddp + transient + CUDA_CONTEXT_BYTES
        eval_fsdp = static_fsdp + root + 2 * biggest_unit + transient + CUDA_CONTEXT_BYTES
    if o.optimizer == "adamw8bit" and cfg.device == "cpu":
        notes.append("optim.optimizer = 'adamw8bit' runs on CUDA only: AdamW on the CPU")

    ddp = RankMemory("DDP", ddp_rows, startup=0, eval_peak=eval_ddp)
    fsdp = RankMemory("FSDP", fsdp_rows, eval_peak=eval_fsdp)
    if startup > fsdp.peak:
        fsdp = RankMemory("FSDP", fsdp_rows, startup=startup, eval_peak=eval_fsdp)
    return MemoryEstimate(
        teacher_class=teacher_class,
        student_kind=s.kind,
        world_size=w,
        batch_size=cfg.data.batch_size,
        total_params=counts.trained + counts.frozen,
        trainable_params=counts.trained,
        frozen_params=counts.frozen,
        teacher_params=counts.teacher,
        bytes_by_dtype={k: dict(sorted(v.items())) for k, v in counts.by_dtype.items()},
        buffer_bytes=counts.buffers,
        ddp=ddp,
        fsdp=fsdp,
        image_tokens=geo.image_tokens if geo else 0,
        text_tokens=geo.text_tokens if geo else 0,
        text_source=text_source,
        hidden=geo.hidden if geo else 0,
        num_blocks=len(geo.blocks) if geo else 0,
        activation_bytes=act,
        gradient_checkpointing=checkpointing,
        optimizer=o.optimizer,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------- the report


def _gib(n: int) -> str:
    """Bytes in GiB (MiB, KiB below one of each)."""
    if n == 0:
        return "0"
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n / 2**10:,.2f} KiB"


def _table(e: MemoryEstimate) -> str:
    lines = []
    what = f"{e.teacher_class} student" if e.student_kind == "diffusers" else "toy student"
    lines.append(f"memory estimate (per rank): {what}, batch {e.batch_size} per rank, world size {e.world_size}")
    if e.num_blocks:
        lines.append(f"  tokens per sample: {e.image_tokens} image + {e.text_tokens} text ({e.text_source})")
        precision = "bf16/fp16 (autocast)" if e.activation_bytes == 2 else "float32"
        lines.append(f"  hidden {e.hidden}, {e.num_blocks} blocks, activations in {precision}, gradient checkpointing "
                     f"{'on' if e.gradient_checkpointing else 'off'}, optimizer {e.optimizer}")  # fmt: skip
    lines.append("")
    lines.append("parameters (exact)                     count          bytes")
    for group, count in (("trained", e.trainable_params), ("frozen", e.frozen_params)):
        dtypes = ", ".join(e.bytes_by_dtype[group])
        size = sum(e.bytes_by_dtype[group].values())
        label = f"  {group} ({dtypes})" if dtypes else f"  {group}"
        lines.append(f"{label:<34}{count:>15,}  {_gib(size):>13}")
    if e.teacher_params:
        lines.append(f"{'    of which the separate teacher':<34}{e.teacher_params:>15,}")
    lines.append(f"{'  total':<34}{e.total_params:>15,}  {_gib(e.trainable_bytes + e.frozen_bytes):>13}")
    lines.append("")
    fsdp_title = f"FSDP ({e.world_size} rank{'s' if e.world_size > 1 else ''})"
    lines.append(f"{'per-rank memory':<32}{'':<11}{'DDP':>11}  {fsdp_title:>15}")
    for d_row, f_row in zip(e.ddp.rows, e.fsdp.rows):
        kind = "exact" if d_row.exact and f_row.exact else ("estimate" if not (d_row.exact or f_row.exact) else "exact|est.")
        lines.append(f"  {d_row.name:<30}{kind:<11}{_gib(d_row.bytes):>11}  {_gib(f_row.bytes):>15}")
    lines.append(f"  {'peak while training':<30}{'estimate':<11}{_gib(e.ddp.peak):>11}  {_gib(e.fsdp.peak):>15}")
    if e.fsdp.startup:
        lines.append(f"  {'start-up (before sharding)':<30}{'exact|est.':<11}{'':>11}  {_gib(e.fsdp.startup):>15}")
    if e.ddp.eval_peak:
        lines.append(f"  {'evaluation (no grad)':<30}{'estimate':<11}{_gib(e.ddp.eval_peak):>11}  "
                     f"{_gib(e.fsdp.eval_peak):>15}")  # fmt: skip
    lines.append(f"  {'needed per GPU (the largest)':<30}{'estimate':<11}{_gib(e.ddp.worst):>11}  {_gib(e.fsdp.worst):>15}")
    lines.append("")
    for layout in (e.ddp, e.fsdp):
        for r in layout.rows:
            if r.note:
                lines.append(f"  [{layout.layout}] {r.name}: {r.note}")
    lines.append("")
    lines.append("exact: parameter counts and bytes, and what follows from them by the trainer's code (EMA, gradients,")
    lines.append("DDP buckets, optimizer state, FSDP shards); estimates: activations (a rough per-block model, about")
    lines.append("+-30%), FSDP's gathered units, the CUDA context and allocator fragmentation. Not counted: NCCL buffers,")
    lines.append("the VAE an evaluation decodes with, host memory (checkpoints, data). 1 GiB = 2^30 bytes.")
    for n in e.notes:
        lines.append(f"- {n}")
    return "\n".join(lines)
