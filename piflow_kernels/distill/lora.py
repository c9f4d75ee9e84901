"""LoRA students through ``peft``: adapters on the teacher's trunk, the policy head trained fully, the rest frozen.

    >>> student = build_student(teacher, "GMFlow", copy_teacher=False)    # the teacher's own modules
    >>> student.attach_teacher_head(teacher_out_layer)                     # the tied teacher (as_teacher=True)
    >>> trained = add_lora(student, rank=256, dropout=0.05)                # the official FLUX.1 targets
    >>> [n for n, p in student.named_parameters() if p.requires_grad] == trained
    True

The official recipes (LakonLab ``configs/piflux``, ``configs/piqwen``) put rank-256 adapters (alpha = rank,
dropout 0.05) on the feed-forward layers and the timestep embedder, and train the policy head, its log-std MLP
and ``norm_out`` fully: :data:`LORA_TARGETS` and :data:`TRAIN_MODULES`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from piflow_kernels.distill.config import ConfigError

__all__ = ["LORA_TARGETS", "TRAIN_MODULES", "ADAPTER_NAME", "add_lora", "lora_target_names", "trainable_names"]

ADAPTER_NAME = "default"

#: teacher class -> module-name suffixes that get adapters by default (the official pi-FLUX / pi-Qwen targets;
#: SD3 has no official recipe: its feed-forward layers and timestep embedder, as FLUX's)
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": (
        "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "timestep_embedder.linear_1", "timestep_embedder.linear_2",
    ),
    "QwenImageTransformer2DModel": (
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
        "timestep_embedder.linear_1", "timestep_embedder.linear_2",
    ),
    "SD3Transformer2DModel": (
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "timestep_embedder.linear_1", "timestep_embedder.linear_2",
    ),
    # FLUX.2: LakonLab publishes no pi-FLUX.2 training config; these are the targets of its FLUX.2 recipe
    # (configs/asymflow/asymflux2_klein_*: the feed-forward layers, the single blocks' fused output projection
    # single_transformer_blocks.*.attn.to_out and the timestep embedder), FLUX.1's pi-FLUX targets in FLUX.2's
    # names. "attn.to_out" matches the single blocks' Linear only (a double block's attn.to_out is a ModuleList).
    "Flux2Transformer2DModel": (
        "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out", "attn.to_out",
        "timestep_embedder.linear_1", "timestep_embedder.linear_2",
    ),
    # Wan (video; no official pi-Flow recipe): FLUX.1's targets in Wan's names, the blocks' feed-forward layers
    # (blocks.*.ffn) and the timestep embedder (condition_embedder.time_embedder)
    "WanTransformer3DModel": ("ffn.net.0.proj", "ffn.net.2", "time_embedder.linear_1", "time_embedder.linear_2"),
}  # fmt: skip

#: teacher class -> module-name suffixes trained fully besides the policy head (the official ``freeze_exclude``)
TRAIN_MODULES: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("norm_out",),
    "QwenImageTransformer2DModel": ("norm_out",),
    "SD3Transformer2DModel": ("norm_out",),
    "Flux2Transformer2DModel": ("norm_out",),
    # Wan's norm_out is a LayerNorm without weights (its shift and scale come from the frozen scale_shift_table and
    # the time embedding): nothing to train besides the head
    "WanTransformer3DModel": (),
}

# module types that get adapters
_ADAPTABLE = (nn.Linear,)  # LoRA on Linear layers only: the merge into a saved student is W + s B A


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _unused_outputs(trunk: nn.Module, teacher_class: str) -> tuple[str, ...]:
    """Modules whose output never reaches the trunk's output: an adapter there would get no gradient (and DDP
    would wait for it). Qwen-Image's last block updates the text stream after its last use (the official recipe
    leaves that block's ``txt_mlp`` out: blocks 0..58 of 60)."""
    if teacher_class == "QwenImageTransformer2DModel":
        last = len(trunk.transformer_blocks) - 1
        return (f"transformer_blocks.{last}.txt_mlp",)
    return ()


def lora_target_names(trunk: nn.Module, teacher_class: str, patterns: Sequence[str], head_attr: str) -> list[str]:
    """Full names of the trunk's modules that get adapters: those whose name is, or ends with ``.`` + , a pattern.

    Empty ``patterns``: :data:`LORA_TARGETS` of the class (of which a small trunk may lack some: SD3's last block has
    no ``ff_context``). The policy head (``head_attr``) is never adapted. Raises :class:`ConfigError` naming
    ``student.lora_target_modules`` for a given pattern that matches no adaptable module, or when nothing matches.
    """
    given = bool(patterns)
    if not patterns:
        if teacher_class not in LORA_TARGETS:
            raise ConfigError(
                f"config key student.lora_target_modules: no default LoRA targets for a {teacher_class} student; "
                "name the modules (suffixes of module names, e.g. 'ff.net.2')"
            )
        patterns = LORA_TARGETS[teacher_class]
    skip = (head_attr, *_unused_outputs(trunk, teacher_class))
    found: dict[str, list[str]] = {p: [] for p in patterns}
    for name, module in trunk.named_modules():
        if not isinstance(module, _ADAPTABLE) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        for p in patterns:
            if _matches(name, p):
                found[p].append(name)
    empty = [p for p, names in found.items() if not names]
    if empty and (given or len(empty) == len(found)):
        raise ConfigError(
            f"config key student.lora_target_modules: {empty} match no Linear module of the "
            f"{teacher_class} trunk (patterns are module-name suffixes, e.g. 'ff.net.2')"
        )
    return sorted({n for names in found.values() for n in names})


def add_lora(
    student: nn.Module,
    rank: int,
    alpha: float = 0.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] = (),
    train_modules: Sequence[str] | None = None,
) -> list[str]:
    """Put LoRA adapters on ``student.trunk`` (a :class:`~piflow_kernels.PiFlowStudent`) and freeze the rest.

    Trained: the adapters (``peft.LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout)``, adapter
    ``"default"``), the policy head, the log-std MLP and the ``train_modules`` (module-name suffixes; None: the
    class's :data:`TRAIN_MODULES`). The frozen weights keep their dtype. A student with a tied teacher
    (``student.has_teacher``) keeps a frozen copy of each fully trained module for its teacher first. Returns the
    trained parameters' names.
    """
    try:
        from peft import LoraConfig
    except ImportError as err:  # pragma: no cover - peft is in the [diffusers] extra
        raise ImportError("student.lora_rank > 0 needs peft: pip install 'piflow_kernels[diffusers]'") from err
    if rank < 1:
        raise ConfigError(f"config key student.lora_rank must be >= 1 for LoRA, got {rank}")
    teacher_class = student.teacher_class
    head_attr = student._arch.out_attr
    names = lora_target_names(student.trunk, teacher_class, list(target_modules), head_attr)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), lora_dropout=float(dropout), target_modules=names)
    student.trunk.add_adapter(config, adapter_name=ADAPTER_NAME)
    student.requires_grad_(False)
    for name, param in student.trunk.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
    full = TRAIN_MODULES.get(teacher_class, ()) if train_modules is None or not list(train_modules) else tuple(train_modules)
    getattr(student.trunk, head_attr).requires_grad_(True)
    if hasattr(student, "proj_out_logstds"):
        student.proj_out_logstds.requires_grad_(True)
    for suffix in full:
        hits = [n for n, _ in student.trunk.named_modules() if n and _matches(n, suffix)]
        if not hits:
            raise ConfigError(f"config key student.train_modules: {suffix!r} matches no module of the {teacher_class} trunk")
        for name in hits:
            if getattr(student, "has_teacher", False):
                student.keep_teacher_module(name)
            student.trunk.get_submodule(name).requires_grad_(True)
    return trainable_names(student)


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the parameters that get gradients."""
    return [name for name, p in module.named_parameters() if p.requires_grad]
