"""``sample``: the few-step pi-Flow sampling loop for any student callable.

    >>> import piflow_kernels as pk
    >>> noise = torch.randn(2, 4, 32, 32, device="cuda")
    >>> x0 = pk.sample(student, noise, num_inference_steps=4, encoder_hidden_states=emb)

``student(x_t, timestep, **model_kwargs)`` returns a policy output (GMFlowOutput, DXOutput, a mapping
or a ModelOutput with the policy's fields); the scheduler turns each one into the next sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from piflow_kernels.scheduler import PiFlowScheduler

__all__ = ["sample"]


@torch.no_grad()
def sample(
    student: Callable[..., object],
    noise: torch.Tensor,
    num_inference_steps: int,
    scheduler: PiFlowScheduler | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = True,
    seq_len: int | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Run the few-step sampler from ``noise`` to the final latents.

    Args:
        student: callable ``student(x_t, timestep, **model_kwargs)``: x_t (B, C, *S) in the dtype of ``noise``,
            timestep (B,) float32 tensor on the device of ``noise`` (``sigma * num_train_timesteps``);
            returns the policy output the scheduler's ``policy_type`` expects.
        noise: (B, C, H, W) or (B, C, T, H, W) the initial sample at sigma = 1.
        num_inference_steps: number of student calls (any number >= 1).
        scheduler: a :class:`PiFlowScheduler` (its schedule is reset here); default ``PiFlowScheduler()``.
            With ``use_dynamic_shifting`` the shift follows ``seq_len`` (below).
        generator: for the re-noising noise when the scheduler's h != 0.
        progress: show a tqdm bar advancing once per student call.
        seq_len: sequence length for the dynamic shift; default ``prod(S)`` (latent pixels). FLUX-style
            transformers count packed 2x2 tokens: pass ``H * W // 4`` to match their pipelines' shift.
        **model_kwargs: passed to every student call (e.g. text embeddings).

    Returns:
        (B, C, *S) final latents, dtype of ``noise``.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor (B, C, *S), got {type(noise).__name__}")
    if noise.dim() not in (4, 5):
        raise ValueError(f"noise must have shape (B, C, H, W) or (B, C, T, H, W), got {tuple(noise.shape)}")
    if not callable(student):
        raise TypeError(f"student must be callable as student(x_t, timestep, **kwargs), got {type(student).__name__}")
    if scheduler is None:
        scheduler = PiFlowScheduler()
    elif not isinstance(scheduler, PiFlowScheduler):
        raise TypeError(
            f"scheduler must be a PiFlowScheduler, got {type(scheduler).__name__} (use PiFlowScheduler.from_config("
            "your_scheduler.config) to convert a flow-matching scheduler)"
        )
    batch = noise.shape[0]
    if seq_len is None:
        seq_len = noise.shape[2:].numel()
    scheduler.set_timesteps(num_inference_steps, device=noise.device, seq_len=seq_len)
    scheduler.set_begin_index(0)

    x = noise
    with tqdm(total=scheduler.num_inference_steps, disable=not progress, desc="pi-Flow sampling") as bar:
        for t in scheduler.timesteps:  # 0-d device tensors: no host synchronisation
            output = student(x, t.expand(batch), **model_kwargs)
            x = scheduler.step(output, t, x, generator=generator).prev_sample
            bar.update(1)
    return x
