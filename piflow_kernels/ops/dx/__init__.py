"""DX policy ops: ``torch_twin`` (any device; the rollout in closed form), ``oracle`` (the reference as a
backend), ``triton_common`` / ``triton_velocity`` / ``triton_rollout`` (the fused kernels, imported only
when the Triton backend is used)."""
