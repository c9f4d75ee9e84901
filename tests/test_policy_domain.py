"""The policies' input domain (docs/design.md#domain-of-the-inputs): every bad input is an error of a stated type naming
its argument; the data checks (finite tensors, sigma <= sigma_src) run on CPU tensors by default, follow
``validate=`` and ``PIFLOW_VALIDATE``, and step aside under torch.compile; numpy scalars count as numbers;
an explicit backend that cannot run a policy is an error."""

import numpy as np
import pytest
import torch
from conftest import rel_err

import piflow_kernels as pk
from piflow_kernels.checks import ENV_VALIDATE, validation_on
from piflow_kernels.ops.dx import triton_common as dx_common
from piflow_kernels.ops.gm import triton_common as gm_common
from piflow_kernels.policies import SIGMA_SRC_RTOL

B, K, C, N, SP = 2, 3, 4, 5, (3, 4)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VALIDATE, raising=False)
    monkeypatch.delenv("PIFLOW_BACKEND", raising=False)


def gm_args(seed=0, k=K, c=C):
    """[means, logweights, logstds, x_src, sigma_src] of a small CPU GM policy (sigma_src 0.8)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, k, c, *SP, generator=g),
        torch.randn(B, k, 1, *SP, generator=g).log_softmax(1),
        torch.full((B, 1, 1, 1, 1), -1.0),
        torch.randn(B, c, *SP, generator=g),
        0.8,
    ]


def dx_args(seed=0, n=N):
    """[grid, x_src, sigma_src] of a small CPU DX policy (sigma_src 0.8)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, C, *SP, generator=g), torch.randn(B, C, *SP, generator=g), 0.8]


def gm(**kwargs):
    return pk.GMFlowPolicy(*gm_args(), **kwargs)


def dx(**kwargs):
    return pk.DXPolicy(*dx_args(), **kwargs)


def poisoned(t, value, index=(0, 0)):
    t = t.clone()
    t[index] = value
    return t


def gm_with(i, value, index=(0, 0)):
    """gm_args() with argument ``i`` poisoned at ``index``."""
    args = gm_args()
    args[i] = poisoned(args[i], value, index)
    return args


def lonely_pixel_logweights():
    """Logweights whose pixel (0, 0) of sample 0 has every component at -inf."""
    lw = gm_args()[1].clone()
    lw[0, :, 0, 0, 0] = -INF
    return lw


X = torch.randn(B, C, *SP, generator=torch.Generator().manual_seed(9))

# (id, call, error type, message fragment): each fragment names the argument
BAD_INPUTS = [
    # policy tensors
    ("means-nan", lambda: pk.GMFlowPolicy(*gm_with(0, NAN)), ValueError, "means must be finite"),
    ("means-inf", lambda: pk.GMFlowPolicy(*gm_with(0, INF)), ValueError, "means must be finite"),
    ("logweights-nan", lambda: pk.GMFlowPolicy(*gm_with(1, NAN)), ValueError, "logweights must be finite or -inf"),
    ("logweights-plus-inf", lambda: pk.GMFlowPolicy(*gm_with(1, INF)), ValueError, "logweights must be finite or -inf"),
    ("logweights-pixel-all-neg-inf", lambda: pk.GMFlowPolicy(gm_args()[0], lonely_pixel_logweights(), *gm_args()[2:]),
     ValueError, "logweights must have a finite entry"),
    ("logstds-nan", lambda: pk.GMFlowPolicy(*gm_with(2, NAN)), ValueError, "logstds must be finite"),
    ("logstds-inf", lambda: pk.GMFlowPolicy(*gm_with(2, -INF)), ValueError, "logstds must be finite"),
    ("gm-x_src-nan", lambda: pk.GMFlowPolicy(*gm_with(3, NAN)), ValueError, "x_src must be finite"),
    ("grid-nan", lambda: pk.DXPolicy(poisoned(dx_args()[0], NAN), *dx_args()[1:]), ValueError, "grid must be finite"),
    ("dx-x_src-inf", lambda: pk.DXPolicy(dx_args()[0], poisoned(dx_args()[1], INF), 0.8), ValueError, "x_src must be finite"),
    ("sigma_src-above-1", lambda: pk.GMFlowPolicy(*gm_args()[:4], 1.5), ValueError, "sigma_src must lie in [0, 1]"),
    ("sigma_src-nan-numpy", lambda: pk.DXPolicy(*dx_args()[:2], np.float32(NAN)), ValueError, "sigma_src must lie in [0, 1]"),
    ("sigma_src-str", lambda: pk.DXPolicy(*dx_args()[:2], "0.8"), TypeError, "sigma_src must be a float"),
    # policy settings
    ("segment_size-inf", lambda: dx(segment_size=INF), ValueError, "segment_size must be a finite number"),
    ("segment_size-nan", lambda: dx(segment_size=NAN), ValueError, "segment_size must be a finite number"),
    ("segment_size-zero", lambda: dx(segment_size=0.0), ValueError, "segment_size must be > 0"),
    ("segment_size-none", lambda: dx(segment_size=None), TypeError, "segment_size must be a number"),
    ("dx-shift-inf", lambda: dx(shift=INF), ValueError, "shift must be a positive finite number"),
    ("dx-shift-negative", lambda: dx(shift=-2.0), ValueError, "shift must be a positive finite number"),
    ("dx-shift-str", lambda: dx(shift="3"), TypeError, "shift must be a number"),
    ("mode", lambda: dx(mode="cubic"), ValueError, "mode must be"),
    ("backend", lambda: gm(backend="cuda"), ValueError, "backend must be"),
    ("validate-str", lambda: gm(validate="yes"), TypeError, "validate must be None, True or False"),
    # velocity
    ("velocity-gm-sigma-above-sigma_src", lambda: gm().velocity(X, 0.9), ValueError, "sigma must not exceed sigma_src"),
    ("velocity-dx-sigma-above-sigma_src", lambda: dx().velocity(X, torch.tensor([0.5, 0.81])), ValueError,
     "sigma must not exceed sigma_src"),
    ("velocity-sigma-above-1", lambda: gm().velocity(X, 1.5), ValueError, "sigma must lie in [0, 1]"),
    ("velocity-x-nan", lambda: gm().velocity(poisoned(X, NAN), 0.5), ValueError, "x must be finite"),
    ("velocity-sigma-none", lambda: dx().velocity(X, None), TypeError, "sigma must be a float"),
    # rollout
    ("rollout-sigma_start-above-sigma_src", lambda: gm().rollout(X, 1.0, 0.0), ValueError,
     "sigma_start must not exceed sigma_src"),
    ("rollout-dx-sigma_start-above-sigma_src", lambda: dx().rollout(X, torch.tensor([0.8, 0.9]), 0.1), ValueError,
     "sigma_start must not exceed sigma_src"),
    ("rollout-sigma_end-above-sigma_start", lambda: gm().rollout(X, 0.3, 0.6), ValueError,
     "sigma_end must not exceed sigma_start"),
    ("rollout-x_start-inf", lambda: dx().rollout(poisoned(X, -INF), 0.8, 0.2), ValueError, "x_start must be finite"),
    ("rollout-total_substeps-float", lambda: gm().rollout(X, 0.8, 0.2, total_substeps=np.float64(16)), TypeError,
     "total_substeps must be an int"),
    ("rollout-total_substeps-zero", lambda: gm().rollout(X, 0.8, 0.2, total_substeps=np.int64(0)), ValueError,
     "total_substeps must be >= 1"),
    ("rollout-shift-none", lambda: gm().rollout(X, 0.8, 0.2, shift=None), TypeError, "shift must be a number"),
    ("rollout-shift-inf", lambda: dx().rollout(X, 0.8, 0.2, shift=INF), ValueError, "shift must be a positive finite number"),
    # temperature and dropout
    ("temperature-none", lambda: gm().temperature(None), TypeError, "temperature must be a number"),
    ("temperature-str", lambda: gm().temperature("0.5"), TypeError, "temperature must be a number"),
    ("temperature-inf", lambda: gm().temperature(INF), ValueError, "temperature must be a finite number"),
    ("temperature-zero", lambda: gm().temperature(np.float32(0.0)), ValueError, "temperature must be > 0"),
    ("dropout-p-none", lambda: gm().dropout(None), TypeError, "dropout p must be a number"),
    ("dropout-p-nan", lambda: gm().dropout(NAN), ValueError, "dropout p must be a finite number"),
    ("dropout-p-one", lambda: gm().dropout(np.float64(1.0)), ValueError, "dropout p must lie in [0, 1)"),
    ("dropout-generator", lambda: gm().dropout(0.5, generator=0), TypeError, "generator must be a torch.Generator"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_an_error_naming_the_argument(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert fragment in str(info.value)


def test_the_issue_example_refuses_instead_of_nan():
    """sigma above sigma_src: the GM posterior's denominators var_k * zeta + 1 go negative (8/8 NaN before)."""
    means, lw, _, x_src, _ = gm_args()
    logstds = torch.full((B, 1, 1, 1, 1), 3.0)
    pol = pk.GMFlowPolicy(means, lw, logstds, x_src, 0.2)
    with pytest.raises(ValueError, match="sigma_start must not exceed sigma_src"):
        pol.rollout(x_src, 1.0, 0.0)
    with pytest.raises(ValueError, match="sigma must not exceed sigma_src"):
        pol.velocity(x_src, 1.0)
    off = pk.GMFlowPolicy(means, lw, logstds, x_src, 0.2, validate=False)
    assert not torch.isfinite(off.rollout(x_src, 1.0, 0.0)).all()  # what validation is there to prevent
    assert torch.isfinite(pol.rollout(x_src, 0.2, 0.0)).all()  # from the source point: fine


def test_dropout_that_empties_a_pixel_is_refused():
    """K = 2, pixel a has only component 0, pixel b only component 1: dropping either empties a pixel."""
    means, _, ls, x_src, _ = gm_args(k=2)
    lw = torch.zeros(B, 2, 1, *SP)
    lw[:, 1, :, 0, 0] = -INF
    lw[:, 0, :, 0, 1] = -INF
    pol = pk.GMFlowPolicy(means, lw, ls, x_src, 0.8)
    seed = next(s for s in range(100) if int((torch.rand(B, 2, generator=torch.Generator().manual_seed(s)) < 0.5)[0].sum()) == 1)
    with pytest.raises(ValueError, match="logweights after dropout must have a finite entry"):
        pol.dropout(0.5, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- sigma at sigma_src


@pytest.mark.parametrize("make", [gm, dx], ids=["gm", "dx"])
def test_sigma_at_sigma_src_within_the_rounding_tolerance(make):
    """sigma = sigma_src is the source point (rollouts start there); a few float32 ulps above it (sigmas reaching
    the policy by another float path) still count as it; 1e-5 relative above does not."""
    pol = make()
    s_src = pol.sigma_src  # float32 (B,)
    assert torch.isfinite(pol.velocity(X, s_src)).all()
    assert torch.isfinite(pol.rollout(X, s_src, 0.0, total_substeps=8)).all()
    ulps = s_src.double() * (1 + 0.5 * SIGMA_SRC_RTOL)  # float64, as a float64 schedule would pass it
    assert float((ulps.float() - s_src).max()) > 0  # really above sigma_src after the cast
    assert torch.isfinite(pol.velocity(X, ulps)).all()
    assert torch.isfinite(pol.rollout(X, ulps, 0.0, total_substeps=8)).all()
    with pytest.raises(ValueError, match="sigma must not exceed sigma_src"):
        pol.velocity(X, s_src * (1 + 10 * SIGMA_SRC_RTOL))


def test_warp_round_trip_stays_inside_the_tolerance():
    """pi-ID builds sigma_src = warp(r_src) and queries at warp(r) for r <= r_src: a float32 round trip
    unwarp(warp(r)) lands within the tolerance."""
    from piflow_kernels.timesteps import unwarp, warp

    r = torch.linspace(0.01, 1.0, 997)
    for shift in (1.0, 3.0, 3.2):
        s = warp(r, shift)
        again = warp(unwarp(s, shift), shift)
        assert bool((again <= s * (1 + SIGMA_SRC_RTOL)).all())


# ---------------------------------------------------------------------------------------------- the switches


def test_validation_is_on_for_cpu_and_off_for_cuda_by_default(monkeypatch):
    assert validation_on(None, torch.device("cpu"))
    assert not validation_on(None, torch.device("cuda"))  # no CUDA call: a device object only
    assert validation_on(True, torch.device("cuda")) and not validation_on(False, torch.device("cpu"))
    monkeypatch.setenv(ENV_VALIDATE, "1")
    assert validation_on(False, torch.device("cpu")) and validation_on(None, torch.device("cuda"))
    monkeypatch.setenv(ENV_VALIDATE, "0")
    assert not validation_on(True, torch.device("cpu"))
    monkeypatch.setenv(ENV_VALIDATE, "yes")
    with pytest.raises(ValueError, match=ENV_VALIDATE):
        validation_on(None, torch.device("cpu"))


def _nan_policy(validate=None):
    return pk.GMFlowPolicy(*gm_with(0, NAN), validate=validate)


def test_validate_false_switches_the_data_checks_off():
    pol = _nan_policy(validate=False)  # accepted
    assert torch.isnan(pol.velocity(X, 0.5)).any()  # the NaN passes through, as asked
    pol.velocity(X, 0.95)  # above sigma_src: not checked either
    pol.rollout(X, 0.3, 0.6, total_substeps=4)  # nor the direction
    with pytest.raises(ValueError, match="sigma must lie in"):
        pol.velocity(X, 1.5)  # as_sigma's range check on CPU tensors stays: it is not a domain check
    with pytest.raises(ValueError, match="means must be finite"):
        _nan_policy(validate=True)


def test_the_environment_variable_overrides_validate(monkeypatch):
    monkeypatch.setenv(ENV_VALIDATE, "1")
    with pytest.raises(ValueError, match="means must be finite"):
        _nan_policy(validate=False)
    pol = gm(validate=False)
    with pytest.raises(ValueError, match="sigma must not exceed sigma_src"):
        pol.velocity(X, 0.9)  # read at each call
    monkeypatch.setenv(ENV_VALIDATE, "0")
    _nan_policy(validate=True)
    gm(validate=True).velocity(X, 0.9)


@pytest.mark.cuda
def test_cuda_validation_is_off_by_default_and_on_when_asked():
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in gm_with(0, NAN)]
    pk.GMFlowPolicy(*args)  # no host sync, no check
    with pytest.raises(ValueError, match="means must be finite"):
        pk.GMFlowPolicy(*args, validate=True)
    pol = pk.GMFlowPolicy(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in gm_args()], validate=True)
    with pytest.raises(ValueError, match="sigma must not exceed sigma_src"):
        pol.velocity(X.cuda(), torch.tensor([0.5, 0.9], device="cuda"))
    with pytest.raises(ValueError, match=r"sigma_end must lie in \[0, 1\]"):
        pol.rollout(X.cuda(), 0.8, torch.tensor([0.5, -0.5], device="cuda"))


# ---------------------------------------------------------------------------------------------- numpy scalars


def test_numpy_scalars_work_wherever_numbers_do():
    g = pk.GMFlowPolicy(*gm_args()[:4], np.float64(0.8))
    ref = gm()
    torch.testing.assert_close(g.velocity(X, np.float32(0.5)), ref.velocity(X, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(
        g.rollout(X, np.float32(0.75), np.float64(0.25), total_substeps=np.int64(16), shift=np.float64(3.0)),
        ref.rollout(X, 0.75, 0.25, total_substeps=16, shift=3.0),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(g.temperature(np.float32(0.7)).logweights, ref.temperature(0.7).logweights)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(g.dropout(np.float64(0.3), gen()).logweights, ref.dropout(0.3, gen()).logweights)
    d = pk.DXPolicy(*dx_args()[:2], np.float32(0.8), segment_size=np.float32(0.5), shift=np.float64(2.0))
    d_ref = pk.DXPolicy(*dx_args(), segment_size=0.5, shift=2.0)
    torch.testing.assert_close(d.velocity(X, np.float64(0.4)), d_ref.velocity(X, 0.4), rtol=0, atol=0)
    torch.testing.assert_close(d.rollout(X, 0.8, np.int64(0), total_substeps=np.int32(8)), d_ref.rollout(X, 0.8, 0, 8))
    assert isinstance(d.segment_size, float) and isinstance(d.shift, float)


# ---------------------------------------------------------------------------------------------- explicit backends


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda b: pk.GMFlowPolicy(*gm_args(k=gm_common.MAX_COMPONENTS + 1), backend=b), f"K={gm_common.MAX_COMPONENTS + 1}"),
        (lambda b: pk.GMFlowPolicy(*gm_args(c=gm_common.MAX_CHANNELS + 1), backend=b), f"C={gm_common.MAX_CHANNELS + 1}"),
        (lambda b: pk.DXPolicy(*dx_args(n=dx_common.MAX_POINTS + 1), backend=b), f"N = {dx_common.MAX_POINTS + 1}"),
    ],
    ids=["gm-K", "gm-C", "dx-N"],
)
def test_explicit_triton_out_of_range_is_an_error(make, reason, monkeypatch):
    with pytest.raises(ValueError, match="backend='triton' cannot run") as info:
        make("triton")
    assert reason in str(info.value)
    assert make("torch").backend == "torch"
    monkeypatch.setenv("PIFLOW_BACKEND", "triton")  # the automatic choice (an environment preference) falls back
    pol = make(None)
    assert pol.backend == "triton" and torch.isfinite(pol.velocity(pol.x_src, 0.5)).all()


@pytest.mark.parametrize("make", [gm, dx], ids=["gm", "dx"])
def test_explicit_triton_on_cpu_without_the_interpreter_is_an_error(make, monkeypatch):
    monkeypatch.setattr(gm_common, "INTERPRET", False)
    monkeypatch.setattr(dx_common, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' cannot run .*TRITON_INTERPRET=1"):
        make(backend="triton")
    make(backend="torch")


def test_explicit_triton_on_a_device_without_triton_is_an_error():
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in gm_args()]
    with pytest.raises(ValueError, match="backend='triton' cannot run .*device 'meta'"):
        pk.GMFlowPolicy(*args, backend="triton")
    grid, x_src, s = dx_args()
    with pytest.raises(ValueError, match="backend='triton' cannot run .*device 'meta'"):
        pk.DXPolicy(grid.to("meta"), x_src.to("meta"), s, backend="triton")


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("force", [False, True], ids=["default", "PIFLOW_VALIDATE=1"])
@pytest.mark.parametrize("make", [gm, dx], ids=["gm", "dx"])
def test_validated_cpu_policy_compiles_without_a_graph_break(make, force, monkeypatch):
    """The data checks are data-dependent branches: they step aside while torch.compile traces, so a
    validated CPU policy's velocity + rollout is still one graph (fullgraph=True raises on any break)."""
    if force:
        monkeypatch.setenv(ENV_VALIDATE, "1")
    pol = make(backend="triton")
    assert pol._validating()
    sigma, sigma_end = torch.full((B,), 0.7), torch.full((B,), 0.2)

    def step(x):
        u = pol.velocity(x, sigma)
        return pol.rollout(x - 0.01 * u, sigma, sigma_end, total_substeps=16, shift=3.0)

    torch._dynamo.reset()
    assert rel_err(torch.compile(step, fullgraph=True, backend="eager")(X), step(X)) <= 1e-6
    with pytest.raises(ValueError, match="sigma must not exceed sigma_src"):
        pol.velocity(X, 0.9)  # and eager still checks
