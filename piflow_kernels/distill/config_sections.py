"""The sections of a training config, one dataclass per ``[section]`` of the file (see :mod:`.config`).

Each docstring says what its keys mean; the defaults are the values of a key left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TeacherConfig", "StudentConfig", "DataConfig", "OptimConfig", "EMAConfig", "EvalConfig", "DistributedConfig"]


@dataclass
class TeacherConfig:
    """The teacher.

    kind = "exact": a Gaussian mixture over data of the latent shape in ``[data]``, with ``num_modes``
    random templates (standard normal times ``mode_scale``, drawn from ``seed``), isotropic std ``std``
    and equal weights; the teacher is its closed-form flow velocity.
    kind = "diffusers": a diffusers model loaded from the local directory ``pretrained`` (a model folder
    with a ``config.json``, or a pipeline folder with a ``model_index.json``, whose ``transformer`` or
    ``unet`` is taken, or the ``subfolder`` named) or randomly initialised from the ``model`` dict (seeded
    by ``seed``). Its class is the ``_class_name`` of the folder's ``config.json``; ``model_class``, when
    given, must agree with it (for a ``model`` dict it defaults to "DiTTransformer2DModel"). ``dtype``
    ("float32", "bfloat16", "float16") is the dtype its weights are held in.

    ``prediction_type`` says what the model predicts: "velocity" (``eps - x0``: the flow-matching
    transformers FLUX, SD3, Qwen-Image), "neg_velocity", "x0" or "eps"; "auto" is "velocity".
    ``timestep_convention`` says which time the model takes: "sigma" (in [0, 1]), "timestep" (``sigma *
    num_train_timesteps``) or "reversed" (``(1 - sigma) * num_train_timesteps``); "auto" is "sigma" for
    FLUX / Qwen-Image and "timestep" for the others.

    Guidance. ``embedded_guidance`` is the guidance value a guidance-distilled model takes as an input
    (FLUX.1-dev's ``guidance``; 0: the architecture's default, 3.5 for FLUX.1 and 4.0 for FLUX.2 with
    ``guidance_embeds``, none for a model without a guidance input); the student gets it too.
    ``guidance_scale`` != 1 is true classifier-free guidance: for class-conditional teachers (``[data]
    num_classes``; the unconditional label is ``num_classes``) or for text teachers with negative
    prompt embeddings in the prompt cache; active for timesteps (``sigma * num_train_timesteps``) within
    ``guidance_interval`` = [low, high], everywhere when empty. ``orthogonal_guidance`` in [0, 1] removes
    that fraction of the guidance term's component along the conditional x0 prediction, per sample (the
    official ``orthogonal_guidance``; 0: plain CFG).
    """

    kind: str = "exact"
    seed: int = 1
    num_modes: int = 8
    mode_scale: float = 1.0
    std: float = 0.1
    model_class: str = ""
    model: dict = field(default_factory=dict)
    pretrained: str = ""
    subfolder: str = ""
    dtype: str = "float32"
    prediction_type: str = "auto"
    timestep_convention: str = "auto"
    embedded_guidance: float = 0.0
    guidance_scale: float = 1.0
    guidance_interval: list = field(default_factory=list)
    orthogonal_guidance: float = 0.0


@dataclass
class StudentConfig:
    """The student: ``kind`` "toy" (ToyGMStudent / ToyDXStudent) or "diffusers" (build_student on the teacher).

    Its policy type is ``[piid] policy_type``: "GMFlow" uses ``num_components``, "DX" ``num_points``. ``hidden`` is the toy
    students' width. ``kwargs`` goes to ``build_student`` unchanged. ``init_from`` (optional) is a
    directory saved by ``PiFlowStudent.save_pretrained`` to start from.

    LoRA (diffusers students, through ``peft``). ``lora_rank`` > 0 trains low-rank adapters on the
    trunk's ``lora_target_modules`` (module-name suffixes, e.g. "ff.net.2"; empty: the official targets of
    the architecture, see :data:`piflow_kernels.distill.lora.LORA_TARGETS`) with ``lora_alpha`` (0: the
    rank, as the official recipes) and ``lora_dropout``; the policy head, the log-std MLP and the
    ``train_modules`` (name suffixes of modules trained fully; empty: the architecture's default, "norm_out"
    for FLUX, SD3 and Qwen-Image) are trained fully, every other weight is frozen. ``tie_teacher`` (LoRA
    only): the teacher is the student's own trunk with the adapter disabled and the teacher's output
    layer, so the base weights are held once. ``lora_rank = 0`` fine-tunes the whole trunk.
    ``gradient_checkpointing`` turns on the trunk's own (diffusers) gradient checkpointing.
    ``trainable_dtype`` is the dtype the trained parameters are held in (the frozen base keeps
    ``teacher.dtype``).
    """

    kind: str = "toy"
    num_components: int = 8
    num_points: int = 10
    hidden: int = 64
    kwargs: dict = field(default_factory=dict)
    init_from: str = ""
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=list)
    train_modules: list = field(default_factory=list)
    tie_teacher: bool = True
    gradient_checkpointing: bool = False
    trainable_dtype: str = "float32"


@dataclass
class DataConfig:
    """Latent shape, per-rank batch size and where the training states come from.

    ``mode`` "data_dependent": segment starts made by forward diffusion of real data, drawn from
    ``source`` "exact" (the exact teacher's mixture, or a mixture built like one when the teacher is a
    diffusers model) or "tensors" (the tensor ``x0`` of shape (N, C, H, W) in ``path``, a .safetensors
    or .pt file; an optional ``class_labels`` (N,) tensor rides along) or "latents" (the latent cache folder
    ``path`` written by ``python -m piflow_kernels encode-images``: image latents, paired by index with the
    ``prompt_cache`` of their captions). ``mode`` "data_free": segments
    start from noise, no data needed.
    ``num_classes`` > 0 draws a class label per sample, passed to student and teacher as ``class_labels``.
    ``frames`` 0: image latents (B, C, H, W); > 0: video latents (B, C, frames, H, W) (a Wan teacher), data-free.
    ``prompt_cache`` (a folder written by ``python -m piflow_kernels encode-prompts``) conditions every sample
    on a cached prompt: the micro-batch's prompts are drawn from the cache by the same stateless stream as
    tensor data (seeded epochs, sharded by rank), and their embeddings are passed to student and teacher
    under the teacher's own argument names. The text encoders are never loaded while training.
    """

    mode: str = "data_dependent"
    source: str = "exact"
    path: str = ""
    batch_size: int = 16
    channels: int = 4
    height: int = 8
    width: int = 8
    num_classes: int = 0
    prompt_cache: str = ""
    frames: int = 0


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up from ``warmup_ratio * lr`` to ``lr`` over ``warmup_iters``.

    ``optimizer`` "adamw" (torch's, fused where it can be) or "adamw8bit" (``bitsandbytes``' 8-bit AdamW on
    CUDA: a quarter of the moment memory; on a CPU, or without bitsandbytes, torch's AdamW with one logged reason).

    After the warm-up the learning rate stays at ``lr`` (``lr_decay = "none"``) or follows a cosine
    from ``lr`` down to ``lr_min_ratio * lr`` at ``max_iters`` (``lr_decay = "cosine"``).
    ``grad_clip`` > 0 clips the global gradient norm (the norm is logged either way) from iteration
    ``grad_clip_begin_iter`` on. ``grad_accum`` micro-batches of ``[data] batch_size`` make one step.
    A step whose loss or gradient norm is not finite is skipped (no AdamW update, no EMA update; the
    iteration, the data stream and the LR schedule move on, see :mod:`.trainer`); ``max_nonfinite_steps``
    such steps in a row stop the run with an error (0: never stop). The stop is noticed at the next log
    line or checkpoint, so it may come up to ``log_every`` steps late.
    """

    optimizer: str = "adamw"
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 0.001
    lr_decay: str = "none"
    lr_min_ratio: float = 0.0
    grad_clip: float = 0.0
    grad_clip_begin_iter: int = 0
    grad_accum: int = 1
    max_nonfinite_steps: int = 5


@dataclass
class EMAConfig:
    """EMA of the student: ``ema = decay * ema + (1 - decay) * student`` after every step.

    Before ``start_iter`` the EMA copies the student. ``policy`` "karras" replaces the fixed decay by
    ``min((1 - 1/t)^(gamma + 1), decay)`` with t the number of steps since ``start_iter`` (as the
    official configs), "fixed" uses ``decay``.
    """

    decay: float = 0.999
    start_iter: int = 0
    policy: str = "fixed"
    gamma: float = 7.0


@dataclass
class EvalConfig:
    """Periodic evaluation with the EMA student: sample ``num_samples`` images from fixed noise.

    With an exact teacher the energy distance and sliced W2 to exact data are reported. ``nfe`` 0
    means the pi-ID ``nfe``.

    Text-to-image runs (``data.prompt_cache``) sample the first ``num_prompts`` cached prompts from fixed
    noise instead. With ``teacher_steps`` > 0 (default 28, FLUX.1's default step count; 0: no teacher) the
    teacher samples the same prompts and noise in that many Euler steps (once per run: the teacher and the
    noise are fixed; the result is kept in ``<out_dir>/eval/teacher.safetensors``), the paired latent distance
    between student and teacher samples (the distillation target) is logged, and a grid PNG
    (``<out_dir>/eval/iter_<N>.png``: the student's row above the teacher's) is written, decoded by the VAE of
    the pipeline folder ``vae`` ("auto": ``teacher.pretrained`` when it is a pipeline folder with a ``vae``;
    "": a latent preview, no VAE loaded).
    """

    num_samples: int = 256
    batch_size: int = 64
    nfe: int = 0
    seed: int = 1234
    num_prompts: int = 8
    teacher_steps: int = 28
    vae: str = "auto"


@dataclass
class DistributedConfig:
    """``mode`` "auto" (DDP when launched with WORLD_SIZE > 1), "none", "ddp" or "fsdp" (FSDP2).

    ``backend`` "auto" picks nccl for CUDA and gloo for CPU. ``fsdp_modules`` names the submodule
    classes sharded one by one (e.g. "FluxTransformerBlock"); the root is always sharded.
    ``fsdp_reshard_after_forward`` = false keeps those submodules gathered from forward to backward:
    needed when a model reads a block's weights outside the block's forward (diffusers' DiT reuses
    ``transformer_blocks[0].norm1.emb`` for its output layer), at the cost of memory.
    """

    mode: str = "auto"
    backend: str = "auto"
    fsdp_modules: list = field(default_factory=list)
    fsdp_reshard_after_forward: bool = True
    find_unused_parameters: bool = False
