"""Sample metrics (piflow_kernels.distill.metrics): the energy distance, sliced W2 and k-NN precision / recall
tell one distribution from another, and their checks name what is wrong."""

from __future__ import annotations

import pytest
import torch

from piflow_kernels.distill.metrics import energy_distance, knn_precision_recall, sliced_w2


def test_metrics_separate_distributions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = torch.randn(300, 6, generator=g)
    z = torch.randn(300, 6, generator=g) + 1.5
    assert energy_distance(x, y) < 0.1 < energy_distance(x, z)
    assert sliced_w2(x, y) < 0.2 < sliced_w2(x, z)


def test_metrics_on_known_cases():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 7, generator=g)
    y = torch.randn(400, 7, generator=g)
    far = y + 3.0
    assert energy_distance(x, far) > 20 * abs(energy_distance(x, y))
    assert sliced_w2(x, far) > 5 * sliced_w2(x, y)
    p, r = knn_precision_recall(x, y, k=5)
    assert p > 0.8 and r > 0.8
    p, r = knn_precision_recall(x, far, k=5)
    assert p < 0.05 and r < 0.05
    # mode collapse: every sample at one point is precise but has no recall
    p, r = knn_precision_recall(torch.zeros(400, 7) + 0.01 * torch.randn(400, 7, generator=g), y, k=5)
    assert p > 0.9 and r < 0.1
    with pytest.raises(ValueError, match="same D"):
        energy_distance(x, torch.randn(10, 3, generator=g))


def test_images_are_flattened_and_sliced_w2_needs_equal_counts():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 2, 3, 5, generator=g), torch.randn(50, 2, 3, 5, generator=g)
    assert energy_distance(x, y) == energy_distance(x.flatten(1), y.flatten(1))
    assert sliced_w2(x, y, seed=3) == sliced_w2(x.flatten(1), y.flatten(1), seed=3)
    with pytest.raises(ValueError, match="equal sample counts"):
        sliced_w2(x, y[:40])
    with pytest.raises(ValueError, match="at least two samples"):
        energy_distance(x[:1], y)
