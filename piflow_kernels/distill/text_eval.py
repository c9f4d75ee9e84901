"""Evaluation of a text-to-image student during training: fixed prompts, fixed noise, the teacher's samples beside.

    >>> ev = TextEvaluation(cfg, prompt_source, teacher_class, device)
    >>> metrics = ev.run(ema_student, teacher, iteration, is_main)   # {"eval/latent_rms": ..., ...}; writes the grid

The first ``eval.num_prompts`` prompts of the cache and noise from ``eval.seed`` are the same at every evaluation
and in every run, so the numbers and the grids compare across iterations. The teacher's many-step samples
(``eval.teacher_steps`` Euler steps) depend on neither the iteration nor the student: they are computed once and
kept in ``<out_dir>/eval/teacher.safetensors`` (recomputed when the prompts, noise or steps differ).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from piflow_kernels.distill.config import ConfigError, TrainConfig
from piflow_kernels.distill.eval_grid import (
    EvalPrompts,
    decode_latents,
    fixed_noise,
    latents_preview,
    paired_latent_distance,
    save_grid,
    teacher_samples,
)
from piflow_kernels.distill.evaluation import sample_with
from piflow_kernels.files import DamagedFileError, load_safetensors, read_json

logger = logging.getLogger(__name__)

__all__ = ["TextEvaluation", "PIPELINE_KINDS"]

#: teacher class -> the decode convention of its pipeline (:func:`~piflow_kernels.distill.eval_grid.decode_latents`)
PIPELINE_KINDS = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "QwenImageTransformer2DModel": "qwen",
    "Flux2Transformer2DModel": "flux2",
    "WanTransformer3DModel": "wan",
}


class TextEvaluation:
    """Samples of the EMA student (and, with ``eval.teacher_steps``, of the teacher) for the fixed evaluation prompts.

    Args:
        cfg: the run's config (``[eval]``, ``[piid]``, ``[data]``, ``out_dir``).
        source: the run's :class:`~piflow_kernels.distill.data.PromptSource` (cache and argument names).
        teacher_class: the teacher's diffusers class (picks the VAE's decode convention).
        device: where sampling runs.
        cast: moves a conditioning dict to the device and the teacher's dtype (the trainer's own conversion).
        extra: conditioning every call gets besides the prompts (FLUX.1's embedded ``guidance`` value), or None.
    """

    def __init__(self, cfg: TrainConfig, source: Any, teacher_class: str, device: torch.device, cast: Any,
                 extra: dict[str, float] | None = None) -> None:  # fmt: skip
        e, d = cfg.eval, cfg.data
        self.cfg, self.device, self.teacher_class = cfg, device, teacher_class
        num = min(e.num_prompts, len(source.cache))
        self.prompts = EvalPrompts.from_cache(source.cache, num=num)
        cond = cast({source.arguments[name]: t for name, t in self.prompts.embeddings.items()})
        for key, value in (extra or {}).items():
            cond[key] = torch.full((num,), float(value), device=device)
        self.teacher_cond = cond
        self.student_cond = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        # (C, H, W), or (C, frames, H, W) for a video teacher
        shape = (d.channels, d.frames, d.height, d.width) if d.frames else (d.channels, d.height, d.width)
        self.noise = fixed_noise(num, shape, e.seed)
        self.folder = Path(cfg.out_dir) / "eval"
        self._reference: torch.Tensor | None = None
        self._vae: Any = None
        self._vae_loaded = False

    # ------------------------------------------------------------------ the teacher's samples, once per run
    def _reference_key(self) -> str:
        e, p = self.cfg.eval, self.cfg.piid
        what = {"prompts": self.prompts.prompts, "indices": list(self.prompts.indices), "seed": e.seed,
                "steps": e.teacher_steps, "shift": p.shift, "teacher": self.cfg.to_dict()["teacher"],
                "shape": list(self.noise.shape)}  # fmt: skip
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    @torch.no_grad()
    def reference(self, teacher: Any, is_main: bool) -> torch.Tensor:
        """The teacher's ``eval.teacher_steps``-step samples (N, C, H, W) of the evaluation prompts and noise."""
        if self._reference is not None:
            return self._reference
        path, key = self.folder / "teacher.safetensors", self._reference_key()
        meta = self.folder / "teacher.json"
        if path.is_file() and meta.is_file():
            try:  # a cache of this run's own: a damaged one is recomputed, with a word
                stored = read_json(meta, "evaluation teacher samples' key")
                if isinstance(stored, dict) and stored.get("key") == key:
                    self._reference = load_safetensors(path, "evaluation teacher samples")["x0"]
                    return self._reference
            except DamagedFileError as err:
                logger.warning("piflow_kernels: recomputing the teacher's evaluation samples (%s)", err)
        e, p = self.cfg.eval, self.cfg.piid
        x = [
            teacher_samples(teacher, self.noise[i : i + e.batch_size].to(self.device), e.teacher_steps, shift=p.shift,
                            num_train_timesteps=p.num_train_timesteps, **_rows(self.teacher_cond, i, e.batch_size))
            for i in range(0, len(self.noise), e.batch_size)
        ]  # fmt: skip
        self._reference = torch.cat(x).float().cpu()
        if is_main:
            from piflow_kernels.distill.checkpoint import atomic_write_bytes, save_safetensors_atomic

            self.folder.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic({"x0": self._reference.contiguous()}, path)
            atomic_write_bytes(meta, json.dumps({"key": key, "prompts": self.prompts.prompts}, indent=1).encode())
        return self._reference

    # ------------------------------------------------------------------ the grid
    def _decoder(self) -> Any:
        if self._vae_loaded:
            return self._vae
        self._vae_loaded = True
        where = self.cfg.eval.vae
        if where == "auto":
            root = Path(self.cfg.teacher.pretrained) if self.cfg.teacher.pretrained else None
            where = str(root) if root is not None and (root / "vae" / "config.json").is_file() else ""
        if where:
            folder = Path(where) / "vae"
            if not (folder / "config.json").is_file():
                raise ConfigError(f"config key eval.vae: {where!r} is not a pipeline folder with a vae/config.json")
            import diffusers

            config = read_json(folder / "config.json", "vae config")
            name = config.get("_class_name", "AutoencoderKL") if isinstance(config, dict) else None
            if not isinstance(name, str) or not isinstance(getattr(diffusers, name, None), type):
                raise DamagedFileError(folder / "config.json", f"vae config: _class_name {name!r} is no diffusers class")
            self._vae = getattr(diffusers, name).from_pretrained(folder, local_files_only=True).eval()
        return self._vae

    def _images(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._decoder()
        kind = PIPELINE_KINDS.get(self.teacher_class)
        if vae is None or kind is None:  # no VAE: a latent preview (of frame 0 for video latents)
            return latents_preview(latents[:, :, 0] if latents.dim() == 5 else latents)
        return decode_latents(vae, latents, kind, batch_size=self.cfg.eval.batch_size)

    # ------------------------------------------------------------------ one evaluation
    @torch.no_grad()
    def run(self, student: Any, teacher: Any, iteration: int, is_main: bool, autocast: Any) -> dict[str, float]:
        """Sample the student (and, once, the teacher); returns the metrics; rank 0 writes the grid (with a teacher)."""
        e = self.cfg.eval
        chunks = []
        for i in range(0, len(self.noise), e.batch_size):
            with autocast():
                x = sample_with(student, self.noise[i : i + e.batch_size].to(self.device), self.cfg.piid,
                                nfe=e.nfe or None, **_rows(self.student_cond, i, e.batch_size))  # fmt: skip
            chunks.append(x.float().cpu())
        samples = torch.cat(chunks)
        metrics: dict[str, float] = {
            "eval/sample_mean": float(samples.mean()),
            "eval/sample_std": float(samples.std()),
            "eval/finite": float(torch.isfinite(samples).all()),
        }
        reference = None
        if e.teacher_steps:
            with autocast():
                reference = self.reference(teacher, is_main)
            distance = paired_latent_distance(samples, reference)
            metrics["eval/latent_rms"] = distance["mean_rms"]
            metrics["eval/latent_relative"] = distance["mean_relative"]
        if is_main and reference is not None:
            path = self.folder / f"iter_{iteration:08d}.png"
            save_grid(path, self._images(samples), self._images(reference), captions=self.prompts.prompts)
        return metrics


def _rows(cond: dict[str, torch.Tensor], start: int, size: int) -> dict[str, torch.Tensor]:
    return {k: v[start : start + size] for k, v in cond.items()}
