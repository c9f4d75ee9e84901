"""Packaging: what the wheel holds, what it requires, and the core working without the optional extras.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``) from a copy of the source tree,
so no build output lands in the checkout. A package folder missing from ``[tool.setuptools] packages`` in
pyproject.toml, or a data file missing from ``package-data``, fails here.
"""

import email.parser
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# build outputs and caches: never part of the source a wheel is built from
_NOT_SOURCE = (".git", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".venv", ".pytest_cache", ".ruff_cache")
# source folder -> its folder in the wheel (pyproject.toml's package-dir: reference/ installs as piflow_kernels.reference)
_SOURCE_TO_WHEEL = {"piflow_kernels": "piflow_kernels", "reference": "piflow_kernels/reference"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    src = tmp_path_factory.mktemp("src") / "piflow_kernels"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), "."]
    done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"building the wheel failed:\n{done.stdout}\n{done.stderr}"
    (path,) = out.glob("piflow_kernels-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def _source_files() -> dict[str, Path]:
    """Every file of the installed packages in the source tree, by its path in the wheel."""
    files = {}
    for source, installed in _SOURCE_TO_WHEEL.items():
        for path in (ROOT / source).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
                files[f"{installed}/{path.relative_to(ROOT / source).as_posix()}"] = path
    return files


def test_reference_installs_under_piflow_kernels(wheel):
    names = wheel.namelist()
    assert "piflow_kernels/reference/gm.py" in names
    assert "piflow_kernels/reference/__init__.py" in names
    assert not [n for n in names if n.startswith("reference/")], "a top-level reference package would land in site-packages"
    top_level = wheel.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    assert top_level == ["piflow_kernels"]


def test_every_source_package_and_file_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    source = _source_files()
    packages = sorted(name.rsplit("/", 1)[0] for name in source if name.endswith("/__init__.py"))
    assert "piflow_kernels/ops" in packages and "piflow_kernels/distill" in packages
    missing_packages = [p.replace("/", ".") for p in packages if f"{p}/__init__.py" not in names]
    assert not missing_packages, f"packages missing from [tool.setuptools] packages in pyproject.toml: {missing_packages}"
    missing_files = sorted(name for name in source if name not in names)
    assert not missing_files, f"files missing from the wheel (a package-data entry?): {missing_files}"


def test_every_folder_of_modules_is_a_package():
    # a folder of modules without __init__.py is a namespace package, which the explicit package list skips
    folders = {p.parent for source in _SOURCE_TO_WHEEL for p in (ROOT / source).rglob("*.py") if "__pycache__" not in p.parts}
    assert not sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())


def _requirements(wheel) -> list[Requirement]:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return [Requirement(line) for line in email.parser.Parser().parsestr(wheel.read(meta).decode()).get_all("Requires-Dist")]


def _required(reqs: list[Requirement], name: str, extra: str = "", **environment: str) -> bool:
    """Whether ``pip install piflow_kernels[extra]`` installs ``name`` (on this platform unless overridden)."""
    env = {**default_environment(), **environment, "extra": extra}
    return any(r.name == name and (r.marker is None or r.marker.evaluate(env)) for r in reqs)


def test_diffusers_and_triton_are_extras(wheel):
    reqs = _requirements(wheel)
    for name in ("torch", "numpy", "safetensors", "tqdm"):
        assert _required(reqs, name), f"{name} must stay a core dependency"
    linux = {"platform_system": "Linux", "platform_machine": "x86_64"}
    for name in ("diffusers", "triton"):
        assert not _required(reqs, name, **linux), f"{name} must not be a core dependency"
        assert _required(reqs, name, extra=name, **linux), f"piflow_kernels[{name}] must install {name}"
    assert not _required(reqs, "triton", extra="triton", platform_system="Darwin", platform_machine="arm64")
    # [test] pulls both extras in (the interpreter tests run the Triton kernels on CPU)
    (test,) = [r for r in reqs if r.name == "piflow_kernels" and r.marker.evaluate({**default_environment(), "extra": "test"})]
    assert test.extras == {"diffusers", "triton"}
    assert _required(reqs, "transformers", extra="test")


_WITHOUT_PROBE = textwrap.dedent(
    """
    import sys
    BLOCKED = sys.argv[1].split(",")
    for name in BLOCKED:
        sys.modules[name] = None  # "import name" (and name.sub) now raises ImportError, as when it is not installed
    import torch
    torch.set_num_threads(1)
    import piflow_kernels as pk

    g = torch.Generator().manual_seed(0)
    B, K, C, H, W = 2, 3, 4, 5, 6
    x = torch.randn(B, C, H, W, generator=g)
    means = torch.randn(B, K, C, H, W, generator=g)
    logweights = torch.randn(B, K, 1, H, W, generator=g).log_softmax(1)
    logstds = torch.full((B, 1, 1, 1, 1), -1.0)
    grid = torch.randn(B, 4, C, H, W, generator=g)
    for pol in (pk.GMFlowPolicy(means, logweights, logstds, x, 0.9), pk.DXPolicy(grid, x, 0.9)):
        u = pol.velocity(x, 0.9)
        x_end = pol.rollout(x, 0.9, 0.3, total_substeps=16)
        assert u.shape == x_end.shape == x.shape and bool(torch.isfinite(x_end).all()), type(pol).__name__

    def student(x_t, timestep):  # a tiny callable student: GM policy outputs that depend on x_t and t
        sigma = (timestep / 1000).reshape(-1, 1, 1, 1, 1)
        return pk.GMFlowOutput(means=0.5 * x_t.unsqueeze(1) + sigma * means, logweights=logweights, logstds=logstds)

    x0 = pk.sample(student, x, 3, progress=False)  # no scheduler: the default settings, no diffusers needed
    assert x0.shape == x.shape and bool(torch.isfinite(x0).all())

    loaded = [m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] in BLOCKED]
    assert not loaded, loaded
    if "diffusers" in BLOCKED:
        for name in ("PiFlowScheduler", "build_student", "to_piflow", "load_official_adapter"):
            try:
                getattr(pk, name)
            except ImportError as err:
                assert "piflow_kernels[diffusers]" in str(err), (name, str(err))
            else:
                raise AssertionError(f"pk.{name} imported without diffusers")
    print("ok")
    """
)


@pytest.mark.parametrize("blocked", ["diffusers", "triton"], ids=lambda b: f"without-{b}")
def test_core_works_without_optional_extras(blocked):
    """Policies, their velocity and rollout, and pk.sample with a callable student, with ``blocked`` unimportable."""
    env = {**os.environ, "PIFLOW_COMPILE": "0"}  # the semantics do not depend on torch.compile; skip its first compile
    cmd = [sys.executable, "-c", _WITHOUT_PROBE, blocked]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), f"{done.stdout}\n{done.stderr}"
