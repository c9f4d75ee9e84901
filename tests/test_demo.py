"""The demo: `--quick` runs end to end and writes every row and the figure; its exact teacher is right.

The exact teacher's velocity E[eps - x0 | x_t] is checked against a self-normalised importance-sampling
(Monte-Carlo) estimate built from exact samples only: with x0_i ~ data, weights proportional to the
likelihood N(x_t; (1 - s) x0_i, s^2 I), u_MC = (x_t - sum_i w_i x0_i) / s.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from piflow_kernels import demo
from piflow_kernels.distill.config import TrainConfig
from piflow_kernels.distill.metrics import energy_distance
from piflow_kernels.distill.teachers import ExactGMTeacher, GaussianMixtureData

EXPECTED_ROWS = [("data", 0)] + [("teacher-euler", n) for n in (128, 4, 2, 1)] + [
    (m, n) for m in ("piflow-gm", "piflow-dx") for n in (4, 2, 1)
]


def test_quick_demo_writes_every_row_and_the_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--seed", "3"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert list(result) == ["rows"]
    rows = result["rows"]
    assert [(r["method"], r["nfe"]) for r in rows] == EXPECTED_ROWS
    for r in rows:
        assert list(r) == ["method", "nfe", "distance", "precision", "recall", "seconds"], r
        assert isinstance(r["nfe"], int)
        for key in ("distance", "precision", "recall", "seconds"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r, key)
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0, r
        assert r["seconds"] >= 0.0
    by_key = {(r["method"], r["nfe"]): r for r in rows}
    # one Euler step maps every noise to E[x0]: a single point, far from the data
    assert by_key[("teacher-euler", 1)]["distance"] > 10 * by_key[("teacher-euler", 128)]["distance"]
    assert by_key[("teacher-euler", 1)]["recall"] == 0.0
    png = out / "samples.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "energy distance" in printed and "piflow-gm" in printed and "teacher-euler" in printed
    # every student is a Trainer run: its log ends at its last iteration
    for method, nfe in EXPECTED_ROWS[5:]:
        records = [json.loads(line) for line in (out / "train" / f"{method}-{nfe}nfe" / "log.jsonl").read_text().splitlines()]
        policy = "GMFlow" if method == "piflow-gm" else "DX"
        assert records[-1]["iteration"] == demo.QUICK.student(policy).iters[nfe] and "loss" in records[-1]
    assert not any(out.rglob("checkpoints"))


def test_each_student_is_a_train_config():
    cfg = demo.train_config("DX", 2, demo.demo_data(), demo.FULL, seed=0, out_dir="unused")
    assert isinstance(cfg, TrainConfig) and cfg.name == "pi-ID DX 2-NFE" and not cfg.final_checkpoint
    assert (cfg.max_iters, cfg.piid.nfe, cfg.piid.policy_type, cfg.piid.window_substeps) == (500, 2, "DX", 3)
    assert (cfg.optim.lr, cfg.optim.lr_decay, cfg.optim.lr_min_ratio, cfg.optim.warmup_iters) == (3e-3, "cosine", 0.1, 50)
    d = cfg.data
    assert (d.mode, d.batch_size, d.channels, d.height, d.width) == ("data_dependent", 256, 1, 8, 8)


def _mc_velocity(data: GaussianMixtureData, x_t: torch.Tensor, sigma: float, num: int, g: torch.Generator):
    """Importance-sampling estimate of E[eps - x0 | x_t] from ``num`` exact samples; also returns the ESS."""
    x0 = data.sample(num, generator=g, dtype=torch.float64).reshape(num, -1)
    xt = x_t.reshape(x_t.shape[0], -1).double()
    logw = -0.5 * torch.cdist(xt, (1 - sigma) * x0).square() / sigma**2
    w = torch.softmax(logw, dim=1)
    u = (xt - w @ x0) / sigma
    return u.reshape(x_t.shape), 1.0 / w.square().sum(1)


@pytest.mark.parametrize("sigma", [0.8, 0.6], ids=lambda s: f"sigma{s}")
def test_exact_teacher_matches_monte_carlo(sigma):
    data = demo.demo_data()
    assert data.shape == (1, 8, 8)
    g = torch.Generator().manual_seed(int(sigma * 100))
    x0 = data.sample(3, generator=g, dtype=torch.float64)
    x_t = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    u_mc, ess = _mc_velocity(data, x_t, sigma, 100_000, g)
    assert bool((ess > 1000).all()), ess  # the estimate is not carried by a handful of samples
    teacher = ExactGMTeacher(data, num_train_timesteps=1000)
    u = teacher(x_t, torch.full((3,), sigma * 1000, dtype=torch.float64))
    rel = ((u - u_mc).flatten(1).norm(dim=1) / u_mc.flatten(1).norm(dim=1)).max()
    assert rel < 0.01, rel
    if sigma == 0.6:
        # the check can fail: a mixture with the wrong noise level (0.3 instead of 0.2) is told apart
        wrong = GaussianMixtureData(data.means, 0.3, data.weights).velocity(x_t, sigma)
        rel_wrong = ((wrong - u_mc).flatten(1).norm(dim=1) / u_mc.flatten(1).norm(dim=1)).min()
        assert rel_wrong > 0.02, rel_wrong


def test_teacher_euler_converges_to_the_data():
    data = demo.demo_data()
    g = torch.Generator().manual_seed(5)
    ref = data.sample(600, generator=g).flatten(1)
    noise = torch.randn((600, *data.shape), generator=g)
    d = {n: energy_distance(demo.teacher_euler(data, noise, n).flatten(1), ref) for n in (1, 4, 64)}
    assert d[64] < d[4] < d[1]


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_distill_student_is_deterministic_and_warm_starts(policy_type):
    data = demo.demo_data()
    sub = dataclasses.replace(demo.QUICK.student(policy_type), iters={2: 3, 1: 2}, batch_size=6)
    tiny = dataclasses.replace(demo.QUICK, gm=sub, dx=sub, hidden=32)
    a, cfg, _ = demo.distill_student(policy_type, 2, data, tiny, seed=7, progress=False)
    b, _, _ = demo.distill_student(policy_type, 2, data, tiny, seed=7, progress=False)
    assert cfg.nfe == 2 and cfg.policy_type == policy_type
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    # a warm start begins from the given weights: after 2 iterations it is closer to them than a fresh start
    warm, _, _ = demo.distill_student(policy_type, 1, data, tiny, seed=7, progress=False, init=a)
    cold, _, _ = demo.distill_student(policy_type, 1, data, tiny, seed=7, progress=False)
    gap = lambda m: sum(float((m.state_dict()[k] - state_a[k]).norm()) for k in state_a)  # noqa: E731
    assert gap(warm) < 0.5 * gap(cold)
