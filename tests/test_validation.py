"""Bad input gives clear errors naming the argument and the expected shape."""

import pytest
import torch

import piflow_kernels as pk


def gm(b=2, k=3, c=4, sp=(5, 6)):
    return (
        torch.randn(b, k, c, *sp),
        torch.randn(b, k, 1, *sp).log_softmax(1),
        torch.randn(b, 1, 1, 1, 1),
        torch.randn(b, c, *sp),
    )


def test_shape_mismatches():
    means, lw, ls, x_src = gm()
    with pytest.raises(ValueError, match=r"means must have shape \(B, K, C, \*S\)"):
        pk.GMFlowPolicy(means[:, :, :3], lw, ls, x_src, 0.5)  # C mismatch
    with pytest.raises(ValueError, match="logweights must have shape"):
        pk.GMFlowPolicy(means, lw[:, :2], ls, x_src, 0.5)  # K mismatch
    with pytest.raises(ValueError, match="means must have shape"):
        pk.GMFlowPolicy(means[..., :4], lw, ls, x_src, 0.5)  # spatial mismatch
    with pytest.raises(ValueError, match="logstds must have shape"):
        pk.GMFlowPolicy(means, lw, torch.randn(2, 2, 1, 1, 1), x_src, 0.5)
    with pytest.raises(ValueError, match=r"x_src must have shape \(B, C, H, W\)"):
        pk.GMFlowPolicy(means, lw, ls, x_src[0], 0.5)
    with pytest.raises(ValueError, match="grid must have shape"):
        pk.DXPolicy(torch.randn(2, 3, 5, 5, 6), x_src, 0.5)
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, 0.5)
    with pytest.raises(ValueError, match="x must have the shape of x_src"):
        pol.velocity(x_src[:, :, :4], 0.3)


def test_integer_dtypes():
    means, lw, ls, x_src = gm()
    with pytest.raises(TypeError, match="means must be a floating-point tensor"):
        pk.GMFlowPolicy(means.long(), lw, ls, x_src, 0.5)
    with pytest.raises(TypeError, match="x_src must be a floating-point tensor"):
        pk.GMFlowPolicy(means, lw, ls, x_src.int(), 0.5)
    with pytest.raises(TypeError, match="grid must be a floating-point tensor"):
        pk.DXPolicy(torch.ones(2, 3, 4, 5, 6, dtype=torch.int32), x_src, 0.5)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pk.GMFlowPolicy(means.numpy(), lw, ls, x_src, 0.5)


def test_mismatched_devices():
    means, lw, ls, x_src = gm()
    with pytest.raises(ValueError, match="one device"):
        pk.GMFlowPolicy(means.to("meta"), lw, ls, x_src, 0.5)


@pytest.mark.parametrize("sigma", [1.5, -0.1, float("nan"), torch.tensor([0.5, 1.2])])
def test_sigma_out_of_range(sigma):
    means, lw, ls, x_src = gm()
    with pytest.raises(ValueError, match=r"sigma_src must lie in \[0, 1\]"):
        pk.GMFlowPolicy(means, lw, ls, x_src, sigma)
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, 0.9)
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        pol.velocity(x_src, sigma)
    with pytest.raises(ValueError, match=r"sigma_end must lie in \[0, 1\]"):
        pol.rollout(x_src, 0.9, sigma)


def test_sigma_bad_shape_and_type():
    means, lw, ls, x_src = gm()
    with pytest.raises(ValueError, match=r"a \(2,\) tensor"):
        pk.GMFlowPolicy(means, lw, ls, x_src, torch.rand(3))
    with pytest.raises(TypeError, match="sigma_src must be a float"):
        pk.GMFlowPolicy(means, lw, ls, x_src, "0.5")


def test_total_substeps_and_direction():
    means, lw, ls, x_src = gm()
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, 0.9)
    with pytest.raises(ValueError, match="total_substeps must be >= 1"):
        pol.rollout(x_src, 0.9, 0.1, total_substeps=0)
    with pytest.raises(TypeError, match="total_substeps must be an int"):
        pol.rollout(x_src, 0.9, 0.1, total_substeps=2.5)
    with pytest.raises(ValueError, match="sigma_end must not exceed sigma_start"):
        pol.rollout(x_src, 0.3, 0.6)
    with pytest.raises(ValueError, match="shift must be a positive"):
        pol.rollout(x_src, 0.9, 0.1, shift=0.0)


def test_empty_batch():
    means, lw, ls, x_src = gm(b=0)
    with pytest.raises(ValueError, match="empty batch"):
        pk.GMFlowPolicy(means, lw, ls, x_src, 0.5)


def test_dx_options():
    x_src = torch.randn(2, 3, 4, 4)
    grid = torch.randn(2, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="mode must be"):
        pk.DXPolicy(grid, x_src, 0.5, mode="cubic")
    with pytest.raises(ValueError, match="segment_size must be > 0"):
        pk.DXPolicy(grid, x_src, 0.5, segment_size=0)


def test_dropout_probability():
    means, lw, ls, x_src = gm()
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, 0.5)
    with pytest.raises(ValueError, match=r"dropout p must lie in \[0, 1\)"):
        pol.dropout(1.0)


def test_repr():
    means, lw, ls, x_src = gm()
    assert "K=3" in repr(pk.GMFlowPolicy(means, lw, ls, x_src, 0.5))
    assert "N=3" in repr(pk.DXPolicy(means, x_src, 0.5))
