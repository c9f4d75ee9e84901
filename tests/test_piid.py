"""pi-ID loss: equality with the literal reference for the same random draws, gradients, both modes, config checks."""

import math

import piflow_kernels.reference.piid as ref_piid
import pytest
import torch
from conftest import rel_err

from piflow_kernels import GMFlowPolicy, warp
from piflow_kernels.distill import (
    ExactGMTeacher,
    GaussianMixtureData,
    PiIDConfig,
    ToyDXStudent,
    ToyGMStudent,
    draw_segment,
    piid_data_free_segments,
    piid_loss_data_dependent,
    piid_segment_loss,
    policy_mean_velocity,
    sample_segment_start,
    segment_window,
    student_policy,
    teacher_ratio,
)
from piflow_kernels.distill.piid import _mean_velocity_max_steps

SHAPE = (2, 3, 5)  # C, H, W: odd on purpose
BATCH = 3


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def data():
    return GaussianMixtureData.random(SHAPE, num_components=3, spread=1.0, std=0.3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teacher(data):
    return ExactGMTeacher(data)


def make_student(policy_type, seed=1, hidden=16):
    torch.manual_seed(seed)
    if policy_type == "GMFlow":
        return ToyGMStudent(*SHAPE, num_components=3, hidden=hidden)
    return ToyDXStudent(*SHAPE, num_points=3, hidden=hidden)


# (id, policy_type, teacher_ratio, PiIDConfig overrides)
CASES = [
    ("GM-q0-w0-s1-f1", "GMFlow", 0.0, {}),
    ("GM-q0.5-w0-drop-s3-f0.5", "GMFlow", 0.5, dict(gm_dropout=0.4, shift=3.0, final_step_size_scale=0.5)),
    ("GM-q0-w2-drop-s1-f0.5", "GMFlow", 0.0, dict(window_substeps=2, gm_dropout=0.4, final_step_size_scale=0.5)),
    ("GM-q0.5-w2-s3-f1-M3", "GMFlow", 0.5, dict(window_substeps=2, shift=3.0, num_intermediate_states=3)),
    (
        "GM-q1-w2-dynshift-drop-M1",
        "GMFlow",
        1.0,
        dict(window_substeps=2, use_dynamic_shifting=True, gm_dropout=0.3, num_intermediate_states=1),
    ),
    ("DX-q0-w0-s1-f1", "DX", 0.0, {}),
    ("GM-q0.5-w2-s3-f0.5-round", "GMFlow", 0.5, dict(window_substeps=2, shift=3.0, final_step_size_scale=0.5, substep_rule="round")),  # noqa: E501
    ("DX-q0.5-w2-s3-f0.5-round", "DX", 0.5, dict(window_substeps=2, shift=3.0, final_step_size_scale=0.5, substep_rule="round")),
    ("DX-q0.5-w0-s3-f0.5", "DX", 0.5, dict(shift=3.0, final_step_size_scale=0.5)),
    ("DX-q0-w2-s3-dxshift2", "DX", 0.0, dict(window_substeps=2, shift=3.0, dx_shift=2.0)),
    (
        "DX-q0.5-w2-s1-f0.5-M3-poly",
        "DX",
        0.5,
        dict(window_substeps=2, final_step_size_scale=0.5, num_intermediate_states=3, dx_mode="polynomial", dx_segment_size=0.4),
    ),
]


def segment_starts(cfg):
    """Three segments: one starting at raw time 1, the final one ending at 0, one off the grid."""
    raw_src = torch.tensor([1.0, cfg.final_segment_size, 0.8])
    segment_size = torch.tensor([cfg.base_segment_size, cfg.final_segment_size, 0.3])
    return raw_src, segment_size


def diffuse(data, raw_src, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = data.sample(BATCH, generator=g)
    sigma = warp(raw_src, cfg.shift_for(math.prod(SHAPE[1:]))).clamp(0, 1)
    s = sigma.reshape(-1, 1, 1, 1)
    return (1 - s) * x0 + s * torch.randn(x0.shape, generator=g), sigma


def reference_segment(student, teacher, x_src, raw_src, segment_size, sigma_src, cfg, q, seed, dtype=torch.float64):
    """The literal reference on the same draws (replayed from the same seed), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    out = student(x_src, sigma_src * cfg.num_train_timesteps).to_dict()
    k = out["means"].shape[1] if cfg.policy_type == "GMFlow" else None
    draws = draw_segment(cfg, segment_size, q, k, g)
    dx = cfg.dx_policy_kwargs()
    loss, x_dst, raw_dst = ref_piid.piid_segment_loss(
        cfg.policy_type,
        {name: t.to(dtype) for name, t in out.items()},
        x_src.to(dtype),
        raw_src.to(dtype),
        segment_size.to(dtype),
        teacher,
        draws.student_intervals,
        draws.teacher_intervals,
        draws.keep_mask,
        total_substeps=cfg.total_substeps,
        window_substeps=cfg.window_substeps,
        shift=cfg.shift_for(math.prod(x_src.shape[2:])),
        num_train_timesteps=cfg.num_train_timesteps,
        loss_scale=cfg.loss_scale,
        dx_segment_size=dx["segment_size"],
        dx_shift=dx["shift"],
        dx_mode=dx["mode"],
        eps=cfg.eps,
        return_x_dst=True,
        substep_rule=cfg.substep_rule,
    )
    return loss, x_dst, raw_dst, g


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_segment_loss_matches_reference(case, data, teacher):
    _, policy_type, q, overrides = case
    cfg = PiIDConfig(nfe=2, policy_type=policy_type, total_substeps=16, loss_scale=3.0, **overrides)
    student = make_student(policy_type)
    params = [p for p in student.parameters()]
    raw_src, segment_size = segment_starts(cfg)
    x_src, sigma_src = diffuse(data, raw_src, cfg, seed=2)

    g = torch.Generator().manual_seed(11)
    loss, x_dst, raw_dst = piid_segment_loss(student, teacher, x_src, raw_src, segment_size, cfg, q, g, return_x_dst=True)
    grads = torch.autograd.grad(loss, params)

    ref_loss, ref_x_dst, ref_raw_dst, g_ref = reference_segment(
        student, teacher, x_src, raw_src, segment_size, sigma_src, cfg, q, seed=11
    )
    ref_grads = torch.autograd.grad(ref_loss, params)

    # both consumed exactly the same draws
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss, ref_loss = float(loss.detach()), float(ref_loss.detach())
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    assert rel_err(x_dst, ref_x_dst) < 1e-5
    torch.testing.assert_close(raw_dst.double(), ref_raw_dst, atol=1e-6, rtol=0)
    flat = torch.cat([gr.reshape(-1) for gr in grads])
    ref_flat = torch.cat([gr.reshape(-1) for gr in ref_grads])
    assert torch.isfinite(flat).all()
    assert float(ref_flat.abs().max()) > 0
    # Near sigma = 0 the GM velocity's gradient w.r.t. logstds is ill-conditioned in float32 (u = (x - x0) / sigma
    # cancels): there the bound is a multiple of the float32 reference's own error, elsewhere 1e-5.
    err = rel_err(flat, ref_flat)
    if err > 1e-5:
        loss32, _, _, _ = reference_segment(student, teacher, x_src, raw_src, segment_size, sigma_src, cfg, q, 11, torch.float32)
        err32 = rel_err(torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss32, params)]), ref_flat)
        assert err <= 8 * err32, (err, err32)


def test_draws_follow_the_teacher_ratio_and_window():
    cfg = PiIDConfig(nfe=3, total_substeps=16, num_intermediate_states=3, window_substeps=2, gm_dropout=0.5)
    segment_size = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.05
    span = segment_size - segment_window(segment_size, cfg)
    for q in (0.0, 0.3, 1.0):
        draws = draw_segment(cfg, segment_size, q, num_components=2, generator=torch.Generator().manual_seed(1))
        assert draws.student_intervals.shape == (64, 3) and draws.teacher_intervals.shape == (64, 3)
        assert (draws.student_intervals >= 0).all() and (draws.teacher_intervals >= 0).all()
        assert (draws.student_intervals.sum(1) <= (1 - q) * span + 1e-6).all()
        torch.testing.assert_close(draws.teacher_intervals.sum(1), q * span, atol=1e-6, rtol=1e-5)
        assert draws.keep_mask.any(1).all(), "GM dropout must keep at least one component per sample"
    # the window is window_substeps substeps of the segment's own substep size
    torch.testing.assert_close(
        segment_window(torch.tensor([0.5, 1 / 3, 0.05]), cfg), torch.tensor([2 / 16, 2 * (1 / 3) / 5, 0.05])
    )


MEAN_VELOCITY_BOUND_CASES = [
    ("nfe4-T128-w0", dict(nfe=4, total_substeps=128)),
    ("nfe3-f0.5-T16-w2-M3", dict(nfe=3, final_step_size_scale=0.5, total_substeps=16, window_substeps=2,
                                 num_intermediate_states=3)),
    ("nfe2-T64-w1", dict(nfe=2, total_substeps=64, window_substeps=1)),
    ("nfe1-T33-w5", dict(nfe=1, total_substeps=33, window_substeps=5)),
]


@pytest.mark.parametrize("overrides", [c[1] for c in MEAN_VELOCITY_BOUND_CASES], ids=[c[0] for c in MEAN_VELOCITY_BOUND_CASES])
@pytest.mark.parametrize("q", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("rule", ["ceil", "round"])
def test_mean_velocity_substep_bound_covers_every_draw(overrides, q, rule):
    """The host-side bound of the mean velocities' substeps (no read-back) holds for every drawn state, and is tight:
    at most one substep above the largest count of a large batch (exactly the window's count when q = 0), under
    either substep rule (ceil with its 1e-5 raw-time slack, round)."""
    cfg = PiIDConfig(**overrides, substep_rule=rule)
    g = torch.Generator().manual_seed(3)
    raw_last, segment_size = sample_segment_start(cfg, 4096, g)
    draws = draw_segment(cfg, segment_size, q, generator=g)
    window = segment_window(segment_size, cfg)
    counts = []
    for i in range(cfg.num_intermediate_states):  # the intervals of piid_segment_loss_from_draws
        raw_a = (raw_last - draws.student_intervals[:, i]).clamp(min=0.0)
        raw_b = (raw_a - draws.teacher_intervals[:, i]).clamp(min=0.0)
        interval = raw_a - (raw_b - window)
        if rule == "ceil":
            counts.append(torch.ceil((interval - 1e-5) * cfg.total_substeps))
        else:
            counts.append(torch.round(interval * cfg.total_substeps))
        raw_last = raw_b
    largest = int(torch.stack(counts).max())
    bound = _mean_velocity_max_steps(cfg, sorted(set(cfg.segment_sizes())), q)
    assert largest <= bound <= largest + 1, (largest, bound)
    if q == 0.0:
        assert bound == largest


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_mean_velocity_with_a_host_bound_is_bit_identical(policy_type, data):
    """max_steps runs a fixed number of substeps (no read-back): values and gradients equal the counted rollout's."""
    cfg = PiIDConfig(nfe=2, policy_type=policy_type, total_substeps=16)
    student = make_student(policy_type)
    x = data.sample(BATCH, generator=torch.Generator().manual_seed(4))
    raw_start = torch.tensor([0.9, 0.5, 0.3])
    raw_end = raw_start - torch.tensor([0.3, 0.05, 0.0])  # 5, 1 and 0 substeps
    sigma = warp(raw_start, 1.0)

    def mean_velocity(**kwargs):
        policy = student_policy(student(x, sigma * 1000), x, sigma, cfg)
        u = policy_mean_velocity(policy, x, raw_start, sigma, raw_end, 1.0, cfg.total_substeps, **kwargs)
        return u, torch.autograd.grad(u.square().sum(), list(student.parameters()))

    counted, counted_grads = mean_velocity()
    for bound in (5, 9):
        u, grads = mean_velocity(max_steps=bound)
        assert torch.equal(u, counted)
        assert all(torch.equal(a, b) for a, b in zip(grads, counted_grads))
    with pytest.raises(RuntimeError, match="max_steps"):
        mean_velocity(max_steps=4)


def test_dropout_draws_as_policy_dropout():
    """draw_segment's dropout mask is exactly what GMFlowPolicy.dropout draws from the same generator."""
    b, k = 16, 5
    cfg = PiIDConfig(gm_dropout=0.45)
    x = torch.randn(b, 2, 3, 3)
    pol = GMFlowPolicy(
        torch.randn(b, k, 2, 3, 3), torch.log_softmax(torch.randn(b, k, 1, 3, 3), 1), torch.randn(b, 1, 1, 1, 1) - 1, x, 0.7
    )
    dropped = pol.dropout(0.45, torch.Generator().manual_seed(5)).logweights[:, :, 0, 0, 0] == float("-inf")
    draws = draw_segment(cfg, torch.full((b,), 0.25), 0.0, k, torch.Generator().manual_seed(5))
    assert torch.equal(dropped, ~draws.keep_mask)
    assert dropped.any()


def test_segment_loss_replays_from_the_generator(data, teacher):
    cfg = PiIDConfig(nfe=2, total_substeps=16, gm_dropout=0.3, window_substeps=2)
    student = make_student("GMFlow")
    raw_src, segment_size = segment_starts(cfg)
    x_src, _ = diffuse(data, raw_src, cfg, seed=3)
    losses = [
        float(
            piid_segment_loss(student, teacher, x_src, raw_src, segment_size, cfg, 0.5, torch.Generator().manual_seed(s))[
                0
            ].detach()
        )
        for s in (4, 4, 5)
    ]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_sample_segment_start_on_the_nfe_grid():
    cfg = PiIDConfig(nfe=4, final_step_size_scale=0.5)
    base = 1 / 3.5
    raw_src, segment_size = sample_segment_start(cfg, 20000, torch.Generator().manual_seed(0))
    starts = torch.tensor([0.5, 1.5, 2.5, 3.5]) * base
    idx = (raw_src[:, None] - starts[None]).abs().argmin(1)
    torch.testing.assert_close(raw_src, starts[idx])
    torch.testing.assert_close(segment_size, torch.where(idx == 0, 0.5 * base, base))
    # segments end on grid points (the last one at 0), and each is drawn with probability = its length
    ends = raw_src - segment_size
    assert float(ends.min()) >= -1e-6
    freq = torch.bincount(idx, minlength=4).double() / idx.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 1, 1, 1], dtype=torch.float64) * base, atol=0.015, rtol=0)


def test_data_dependent_is_forward_diffusion_then_segment(data, teacher):
    """The data-dependent loss = segment start on the grid, x_src = (1-s) x0 + s eps, then the segment loss."""
    cfg = PiIDConfig(nfe=3, total_substeps=16, shift=2.0, num_decay_iters=10, gm_dropout=0.2, final_step_size_scale=0.5)
    student = make_student("GMFlow")
    x0 = data.sample(5, generator=torch.Generator().manual_seed(1))
    loss, logs = piid_loss_data_dependent(student, teacher, x0, cfg, iteration=4, generator=torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(9)
    raw_src, segment_size = sample_segment_start(cfg, 5, g)
    sigma = (2.0 * raw_src / (1 + raw_src)).reshape(-1, 1, 1, 1)
    x_src = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
    expected, _, _ = piid_segment_loss(student, teacher, x_src, raw_src, segment_size, cfg, 0.6, g)
    assert logs["teacher_ratio"] == pytest.approx(0.6)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert float(logs["loss"]) == pytest.approx(float(loss.detach()))


class RecordingStudent(torch.nn.Module):
    """Wraps a student and records what it was called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x_t, timestep):
        self.calls.append((x_t.detach().clone(), x_t.requires_grad, timestep.detach().clone()))
        return self.inner(x_t, timestep)


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_data_free_walks_all_segments(policy_type, teacher):
    cfg = PiIDConfig(
        nfe=3,
        policy_type=policy_type,
        total_substeps=16,
        shift=3.0,
        final_step_size_scale=0.5,
        window_substeps=2,
        num_decay_iters=4,
    )
    student = RecordingStudent(make_student(policy_type))
    noise = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(3))
    yielded = []
    for loss, logs in piid_data_free_segments(
        student, teacher, noise, cfg, iteration=1, generator=torch.Generator().manual_seed(8)
    ):
        loss.backward()  # no retain_graph: fails if a segment's graph reached into the previous one
        yielded.append((loss.detach(), logs))
    assert len(yielded) == cfg.nfe
    sizes = [logs["segment_size"] for _, logs in yielded]
    assert sum(sizes) == pytest.approx(1.0)
    assert sizes == pytest.approx([1 / 2.5, 1 / 2.5, 0.5 / 2.5])
    for step, (loss, logs) in enumerate(yielded):
        assert float(logs["loss"]) == pytest.approx(float(logs[f"loss_step{step}"]) * sizes[step], rel=1e-6)
        assert float(loss) == pytest.approx(float(logs["loss"]), rel=1e-6)  # floats: pytest 9.2 approx refuses 0-d tensors
        assert logs["teacher_ratio"] == pytest.approx(0.75)
    # the student saw noise at sigma = 1, then its own rollouts, never tensors with grad
    assert torch.equal(student.calls[0][0], noise)
    assert not any(requires_grad for _, requires_grad, _ in student.calls)
    raw_starts = torch.tensor([1.0, 1 - 1 / 2.5, 1 - 2 / 2.5])
    expected_t = 1000 * 3 * raw_starts / (1 + 2 * raw_starts)
    torch.testing.assert_close(torch.stack([t[0] for _, _, t in student.calls]), expected_t, rtol=1e-5, atol=1e-3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())

    # the second segment starts from the first one's detached rollout to its end
    g = torch.Generator().manual_seed(8)
    _, x_dst, raw_dst = piid_segment_loss(student.inner, teacher, noise, 1.0, 1 / 2.5, cfg, 0.75, g, return_x_dst=True)
    torch.testing.assert_close(student.calls[1][0], x_dst)
    torch.testing.assert_close(raw_dst, torch.full((BATCH,), 1 - 1 / 2.5))


def test_teacher_queried_without_grad_in_eval_mode(data):
    seen = []

    class Teacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.exact = ExactGMTeacher(data)

        def forward(self, x_t, timestep):
            seen.append((self.training, torch.is_grad_enabled(), x_t.requires_grad))
            return self.exact(x_t, timestep)

    t = Teacher().train()
    cfg = PiIDConfig(nfe=2, total_substeps=8, num_intermediate_states=2)
    x0 = data.sample(2, generator=torch.Generator().manual_seed(0))
    loss, _ = piid_loss_data_dependent(make_student("GMFlow"), t, x0, cfg, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2 and all(s == (False, False, False) for s in seen)
    assert t.training, "the teacher's mode is restored"
    assert loss.requires_grad


def test_training_lowers_the_imitation_loss(data, teacher):
    """A few Adam steps of a tiny student against the exact teacher lower its loss on fixed draws."""
    cfg = PiIDConfig(nfe=1, total_substeps=8, gm_dropout=0.1)
    student = make_student("GMFlow", seed=0, hidden=32)
    x_eval = data.sample(64, generator=torch.Generator().manual_seed(100))

    def eval_loss():
        with torch.no_grad():
            return float(piid_loss_data_dependent(student, teacher, x_eval, cfg, generator=torch.Generator().manual_seed(7))[0])

    before = eval_loss()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for it in range(60):
        x0 = data.sample(32, generator=g)
        loss, _ = piid_loss_data_dependent(student, teacher, x0, cfg, iteration=it, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)


def test_teacher_ratio_decay():
    cfg = PiIDConfig(num_decay_iters=10)
    assert [teacher_ratio(cfg, i) for i in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert teacher_ratio(PiIDConfig(), 0) == 0.0


def test_student_policy_uses_the_dx_settings():
    cfg = PiIDConfig(nfe=4, policy_type="DX", final_step_size_scale=0.5, shift=3.2)
    x = torch.randn(2, 2, 3, 5)
    pol = student_policy(make_student("DX")(x, torch.tensor([900.0, 500.0])), x, torch.tensor([0.9, 0.5]), cfg)
    assert pol.segment_size == pytest.approx(1 / 3.5) and pol.shift == pytest.approx(3.2) and pol.mode == "grid"
    pol = student_policy(
        make_student("DX")(x, torch.tensor([900.0, 500.0])),
        x,
        0.9,
        PiIDConfig(policy_type="DX", dx_segment_size=0.25, dx_shift=2.0, dx_mode="polynomial"),
    )
    assert (pol.segment_size, pol.shift, pol.mode) == (0.25, 2.0, "polynomial")
    with pytest.raises(TypeError, match="DX"):
        student_policy(make_student("GMFlow")(x, torch.tensor([900.0, 500.0])), x, 0.9, cfg)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nfe=0), "nfe must be >= 1"),
        (dict(nfe=2.0), "nfe must be an int"),
        (dict(policy_type="gmflow"), "policy_type must be one of"),
        (dict(total_substeps=0), "total_substeps must be >= 1"),
        (dict(num_intermediate_states=0), "num_intermediate_states must be >= 1"),
        (dict(window_substeps=-1), "window_substeps must be >= 0"),
        (dict(gm_dropout=1.0), r"gm_dropout must lie in \[0, 1\)"),
        (dict(policy_type="DX", gm_dropout=0.1), "gm_dropout applies to GMFlow"),
        (dict(final_step_size_scale=0.0), "final_step_size_scale must be > 0"),
        (dict(shift=-1.0), "shift must be > 0"),
        (dict(shift=float("nan")), "shift must be a finite number"),
        (dict(use_dynamic_shifting=True, max_seq_len=256), "base_seq_len != max_seq_len"),
        (dict(num_decay_iters=-5), "num_decay_iters must be >= 0"),
        (dict(loss_scale=0.0), "loss_scale must be > 0"),
        (dict(num_train_timesteps=0), "num_train_timesteps must be > 0"),
        (dict(dx_segment_size=0.0), "dx_segment_size must be > 0"),
        (dict(dx_mode="cubic"), "dx_mode must be"),
        (dict(eps=0.5), "eps must be small"),
        (dict(backend="cuda"), "backend must be None or one of"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PiIDConfig(**kwargs)


def test_config_from_dict():
    cfg = PiIDConfig.from_dict({"nfe": 2, "shift": 3, "policy_type": "DX"})
    assert cfg.shift == 3.0 and isinstance(cfg.shift, float)
    assert PiIDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown PiIDConfig keys \\['nfes'\\]"):
        PiIDConfig.from_dict({"nfes": 2})
    assert PiIDConfig(nfe=4, final_step_size_scale=0.5).segment_sizes() == pytest.approx([1 / 3.5] * 3 + [0.5 / 3.5])


class FixedStudent(torch.nn.Module):
    """A 'student' whose output is a parameter: no matmul of its own, so autocast can only touch the policy math."""

    def __init__(self, policy_type, b, k, shape):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.policy_type = policy_type
        self.means = torch.nn.Parameter(torch.randn(b, k, *shape, generator=g))
        self.logits = torch.nn.Parameter(torch.randn(b, k, 1, *shape[1:], generator=g))
        self.logstds = torch.nn.Parameter(torch.full((b, 1, 1, 1, 1), -1.0))

    def forward(self, x_t, timestep):
        if self.policy_type == "DX":
            return {"grid": self.means}
        return {"means": self.means, "logweights": torch.log_softmax(self.logits, 1), "logstds": self.logstds}


@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_policy_math_stays_float32_under_autocast(policy_type, data, teacher):
    cfg = PiIDConfig(nfe=2, policy_type=policy_type, total_substeps=16, window_substeps=2)
    student = FixedStudent(policy_type, BATCH, 3, SHAPE)
    raw_src, segment_size = segment_starts(cfg)
    x_src, _ = diffuse(data, raw_src, cfg, seed=4)
    args = (student, teacher, x_src, raw_src, segment_size, cfg, 0.5)
    plain = piid_segment_loss(*args, generator=torch.Generator().manual_seed(1))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = piid_segment_loss(*args, generator=torch.Generator().manual_seed(1))[0]
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("policy_type", ["GMFlow", "DX"])
def test_segment_loss_on_cuda_triton_matches_reference(policy_type, data, teacher):
    """The fast path on a GPU (Triton rollouts and fused velocity) against the float64 reference on the same draws."""
    dev = torch.device("cuda")
    overrides = dict(gm_dropout=0.3) if policy_type == "GMFlow" else dict(dx_shift=2.0)
    cfg = PiIDConfig(
        nfe=2, policy_type=policy_type, total_substeps=32, window_substeps=3, num_intermediate_states=3,
        final_step_size_scale=0.5, shift=3.0, backend="triton", **overrides,
    )  # fmt: skip
    student = make_student(policy_type).to(dev)
    params = list(student.parameters())
    raw_src, segment_size = segment_starts(cfg)
    x_src, sigma_src = diffuse(data, raw_src, cfg, seed=2)
    x_src, raw_src, segment_size, sigma_src = (t.to(dev) for t in (x_src, raw_src, segment_size, sigma_src))
    g = torch.Generator().manual_seed(11)
    loss, x_dst, _ = piid_segment_loss(student, teacher, x_src, raw_src, segment_size, cfg, 0.5, g, return_x_dst=True)
    grads = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, params)])
    ref_loss, ref_x_dst, _, _ = reference_segment(student, teacher, x_src, raw_src, segment_size, sigma_src, cfg, 0.5, 11)
    ref_grads = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(ref_loss, params)])
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * float(ref_loss.detach())
    assert rel_err(x_dst, ref_x_dst) < 1e-5
    assert rel_err(grads, ref_grads) < 1e-4
