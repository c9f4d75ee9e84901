"""Damaged files: every reader of the library names the file it could not read.

One table of readers (configs, adapters, training checkpoints, tensor caches and the helpers of
``piflow_kernels.files`` themselves), each given a garbled, a truncated and an empty file: every one must
raise :class:`~piflow_kernels.files.DamagedFileError` whose message starts with the damaged file's path.
Each row first reads its intact files, so the damage is what the error is about. The native build cache
is at the end: a corrupted cached library is rebuilt, with the same output bits and one log line.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from piflow_kernels import files
from piflow_kernels.distill import checkpoint as ckpt
from piflow_kernels.distill.config import ConfigError, ConfigFileError, load_config_file
from piflow_kernels.distill.data import load_tensors
from piflow_kernels.files import DamagedFileError

pytestmark = pytest.mark.filterwarnings("ignore:.*has no manifest.json:UserWarning")

LONG_NAME = "a run name long enough that half the file ends inside this string"


# ---------------------------------------------------------------------------------------------- damage


def garble(path: Path) -> None:
    """The same number of bytes, all of them random (seeded: the same bytes on every run)."""
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))


def truncate(path: Path) -> None:
    """The first half of the file, as a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGES: dict[str, Callable[[Path], None]] = {"garbled": garble, "truncated": truncate, "empty": empty}


# ---------------------------------------------------------------------------------------------- readers
# each: tmp folder -> (the file to damage, a call that reads it)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.randn(6, 2, 3, 5, generator=g), "class_labels": torch.arange(6)}


def _safetensors_file(tmp: Path) -> Path:
    save_file(_tensors(), str(tmp / "t.safetensors"), metadata={"note": "intact"})
    return tmp / "t.safetensors"


def _torch_file(tmp: Path) -> Path:
    torch.save(_tensors(), tmp / "t.pt")
    return tmp / "t.pt"


def _toml_config(tmp: Path) -> Path:
    (tmp / "c.toml").write_text(f'name = "{LONG_NAME}"\nseed = 3\n')
    return tmp / "c.toml"


def _json_config(tmp: Path) -> Path:
    (tmp / "c.json").write_text(json.dumps({"name": LONG_NAME, "seed": 3}))
    return tmp / "c.json"


def _checkpoint(tmp: Path, manifest: bool = True) -> Path:
    """A small training checkpoint written by the library (iter 7); without its manifest for the older layout."""
    g = torch.Generator().manual_seed(1)
    student = {"head.weight": torch.randn(8, 4, generator=g), "head.bias": torch.randn(8, generator=g)}
    ema = {k: v * 0.5 for k, v in student.items()}
    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7}, "config": {"seed": 3}}
    ckpt.begin_checkpoint(tmp / "ckpts", 7)
    ckpt.write_rank_rng(tmp / "ckpts", 7, 0)
    path = ckpt.finish_checkpoint(tmp / "ckpts", 7, student, ema, state)
    if not manifest:
        (path / ckpt.MANIFEST_NAME).unlink()
    return path


def checkpoint_row(name: str, manifest: bool = True):
    def make(tmp: Path):
        path = _checkpoint(tmp, manifest)
        return path / name, lambda: ckpt.load_checkpoint(path)

    return make


def _flux_adapter(tmp: Path, shards: bool = False) -> tuple[Path, object]:
    """A GMFlow pi-FLUX.1-style adapter (policy head only) for a tiny FLUX teacher, written as in test_official_weights."""
    pytest.importorskip("diffusers")
    from test_official_weights import gm_head_tensors, write_checkpoint
    from test_students import tiny_teacher

    teacher = tiny_teacher("flux")
    k, c = 3, 3
    tensors = gm_head_tensors(teacher, k, k * 4 * c, k * 4)
    folder = write_checkpoint(tmp / "adapter", tensors, "GMFluxTransformer2DModel", {"type": "GMFlow"}, num_gaussians=k)
    if shards:  # the sharded layout: two files and the index naming them
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        names = sorted(tensors)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
            shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
            save_file({n: tensors[n].contiguous() for n in part}, str(folder / shard))
            weight_map.update(dict.fromkeys(part, shard))
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, teacher


def adapter_row(name: str, shards: bool = False):
    def make(tmp: Path):
        from piflow_kernels import load_official_adapter

        folder, teacher = _flux_adapter(tmp, shards)
        return folder / name, lambda: load_official_adapter(folder, teacher)

    return make


def policy_config_row(tmp: Path):
    from piflow_kernels.official_weights import read_policy_config

    folder, _ = _flux_adapter(tmp)
    return folder / "diffusion_pytorch_model.safetensors", lambda: read_policy_config(folder)


def helper_row(make_file: Callable[[Path], Path], read: Callable[[Path], object]):
    def make(tmp: Path):
        path = make_file(tmp)
        return path, lambda: read(path)

    return make


READERS: dict[str, Callable] = {
    # piflow_kernels.files
    "files.read_json": helper_row(_json_config, files.read_json),
    "files.read_toml": helper_row(_toml_config, files.read_toml),
    "files.load_safetensors": helper_row(_safetensors_file, files.load_safetensors),
    "files.safetensors_metadata": helper_row(_safetensors_file, files.safetensors_metadata),
    "files.torch_load": helper_row(_torch_file, files.torch_load),
    "files.check_torch_file": helper_row(_torch_file, files.check_torch_file),
    # training configs
    "load_config_file-toml": helper_row(_toml_config, load_config_file),
    "load_config_file-json": helper_row(_json_config, load_config_file),
    # the tensor cache of data.source = "tensors"
    "data.load_tensors-safetensors": helper_row(_safetensors_file, lambda p: load_tensors(str(p))),
    "data.load_tensors-pt": helper_row(_torch_file, lambda p: load_tensors(str(p))),
    # training checkpoints (with their manifest, and in the older layout without one)
    "load_checkpoint-state.pt": checkpoint_row("state.pt"),
    "load_checkpoint-student.safetensors": checkpoint_row("student.safetensors"),
    "load_checkpoint-ema.safetensors": checkpoint_row("ema.safetensors"),
    "load_checkpoint-rng_rank0.pt": checkpoint_row("rng_rank0.pt"),
    "load_checkpoint-manifest.json": checkpoint_row("manifest.json"),
    "load_checkpoint-no-manifest-state.pt": checkpoint_row("state.pt", manifest=False),
    "load_checkpoint-no-manifest-student.safetensors": checkpoint_row("student.safetensors", manifest=False),
    "load_checkpoint-no-manifest-rng_rank0.pt": checkpoint_row("rng_rank0.pt", manifest=False),
    # released adapters
    "load_official_adapter-weights": adapter_row("diffusion_pytorch_model.safetensors"),
    "load_official_adapter-config.json": adapter_row("config.json"),
    "load_official_adapter-index": adapter_row("diffusion_pytorch_model.safetensors.index.json", shards=True),
    "load_official_adapter-shard": adapter_row("diffusion_pytorch_model-00002-of-00002.safetensors", shards=True),
    "read_policy_config": policy_config_row,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("reader", list(READERS))
def test_damaged_file_is_named(tmp_path, reader, damage):
    target, read = READERS[reader](tmp_path)
    read()  # the intact files load
    DAMAGES[damage](target)
    with pytest.raises(DamagedFileError) as info:
        read()
    err = info.value
    assert err.path == target
    assert str(err).startswith(f"{target}: "), str(err)
    assert "Traceback" not in str(err) and "\n" not in str(err)


# ---------------------------------------------------------------------------------------------- exact errors


def test_config_errors_name_the_file_and_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'\xff\xfename = "x"\n')
    with pytest.raises(ConfigFileError) as info:
        load_config_file(bad)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, DamagedFileError)
    assert str(info.value).startswith(f"{bad}: training config: not UTF-8 text (UnicodeDecodeError: ")

    garbage = tmp_path / "config.json"
    garbage.write_text("this is not json {")
    with pytest.raises(ConfigFileError, match=r"training config: invalid JSON \(JSONDecodeError: Expecting value"):
        load_config_file(garbage)

    (tmp_path / "empty.toml").write_text("\n")
    with pytest.raises(ConfigFileError, match="training config: empty file$"):
        load_config_file(tmp_path / "empty.toml")

    folder = tmp_path / "configs.toml"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"configs\.toml is a directory, not a file \(training config\)"):
        load_config_file(folder)
    with pytest.raises(FileNotFoundError, match=r"missing\.toml does not exist \(training config\)"):
        load_config_file(tmp_path / "missing.toml")


def test_adapter_config_json_with_garbage(tmp_path):
    pytest.importorskip("diffusers")
    from piflow_kernels import load_official_adapter

    folder, teacher = _flux_adapter(tmp_path)
    (folder / "config.json").write_text("<html>not found</html>")
    with pytest.raises(DamagedFileError) as info:
        load_official_adapter(folder, teacher)
    assert str(info.value).startswith(f"{folder / 'config.json'}: checkpoint config: invalid JSON (JSONDecodeError: ")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(DamagedFileError, match="a JSON list, not an object"):
        load_official_adapter(folder, teacher)


TRUNCATED = "{what}: {n} bytes where the checkpoint's manifest records {size} (truncated)"
GARBLED = "{what}: its sha256 differs from the one the checkpoint's manifest records"


@pytest.mark.parametrize(
    "name,what,damage,expected",
    [
        ("state.pt", "training state", truncate, TRUNCATED),
        ("student.safetensors", "student weights", truncate, TRUNCATED),
        ("rng_rank0.pt", "RNG state", truncate, TRUNCATED),
        ("student.safetensors", "student weights", garble, GARBLED),
        ("state.pt", "training state", garble, GARBLED),
    ],
    ids=["state.pt-truncated", "student-truncated", "rng-truncated", "student-garbled", "state.pt-garbled"],
)
def test_checkpoint_manifest_errors(tmp_path, name, what, damage, expected):
    path = _checkpoint(tmp_path)
    size = (path / name).stat().st_size
    damage(path / name)
    with pytest.raises(DamagedFileError) as info:
        ckpt.load_checkpoint(path)
    n = (path / name).stat().st_size
    assert str(info.value) == f"{path / name}: " + expected.format(what=what, n=n, size=size)


@pytest.mark.parametrize(
    "name,needle",
    [
        ("state.pt", "training state: not a complete torch file (BadZipFile: "),
        ("student.safetensors", "student weights: not a complete safetensors file (SafetensorError: Error while deserializing"),
        ("rng_rank0.pt", "RNG state: not a complete torch file (BadZipFile: "),
    ],
)
def test_checkpoint_without_manifest_errors(tmp_path, name, needle):
    path = _checkpoint(tmp_path, manifest=False)
    truncate(path / name)
    with pytest.raises(DamagedFileError) as info:
        ckpt.load_checkpoint(path)
    assert str(info.value).startswith(f"{path / name}: {needle}"), str(info.value)


def test_torch_load_errors_keep_the_underlying_type(tmp_path):
    path = _torch_file(tmp_path)
    data = path.read_bytes()
    expected = {"truncated": ("RuntimeError", "OSError"), "empty": ("EOFError",), "garbled": ("UnpicklingError",)}
    for damage, types in expected.items():
        path.write_bytes(data)
        DAMAGES[damage](path)
        with pytest.raises(DamagedFileError) as info:
            files.torch_load(path, "tensor cache")
        assert info.value.problem == "tensor cache: not a complete torch file"
        assert info.value.detail.split(":")[0] in types, info.value.detail
        assert len(info.value.detail) <= 260  # the first line of torch's message, capped


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors does not exist \(adapter weights\)"):
        files.load_safetensors(tmp_path / "nope.safetensors", "adapter weights")
    with pytest.raises(IsADirectoryError, match="is a directory, not a file"):
        files.torch_load(tmp_path, "training state")
    with pytest.raises(FileNotFoundError, match="does not exist \\(training checkpoint\\)"):
        ckpt.load_checkpoint(tmp_path / "iter_00000009")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        ckpt.load_checkpoint(_torch_file(tmp_path))


def test_damaged_file_error_pickles_and_is_a_value_error():
    err = DamagedFileError("/x/state.pt", "training state: not a complete torch file", EOFError("Ran out of input"))
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "/x/state.pt: training state: not a complete torch file (EOFError: Ran out of input)"
    assert again.path == Path("/x/state.pt")


# ---------------------------------------------------------------------------------------------- the native build cache


def _rollout_case():
    """A small flat GM policy (B=2, K=4, C=3, 37 pixels: two full native blocks and a partial one) and its plan."""
    from piflow_kernels.ops.records import GMTensors, RolloutPlan

    g = torch.Generator().manual_seed(4)
    b, k, c, n = 2, 4, 3, 37
    policy = GMTensors(
        torch.randn(b, k, c, n, generator=g),
        torch.randn(b, k, n, generator=g).log_softmax(1),
        torch.randn(b, 1, generator=g) * 0.3 - 0.7,
        torch.randn(b, c, n, generator=g),
        torch.tensor([0.9, 0.8]),
    )
    plan = RolloutPlan.build(torch.tensor([0.9, 0.8]), torch.tensor([0.2, 0.0]), 16, 3.0)
    return policy.x_src + 0.1 * torch.randn(b, c, n, generator=g), policy, plan


def test_corrupted_native_build_is_rebuilt_with_the_same_bits(tmp_path, monkeypatch, caplog):
    from piflow_kernels.ops.gm import native

    monkeypatch.delenv("PIFLOW_NATIVE", raising=False)
    x, policy, plan = _rollout_case()

    first = tmp_path / "first"
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(first))
    monkeypatch.setattr(native, "_state", {})
    if not native.available():
        pytest.skip("no C compiler for the native CPU rollout")
    before = native.gm_rollout_native(x, policy, plan)
    (library,) = first.glob("gm_native_*.so")
    assert (first / f"{library.name}.sha256").read_text().strip() == files.sha256_file(library)

    # the same build in a second cache folder (a name this process has not loaded), its library garbled
    second = tmp_path / "second"
    shutil.copytree(first, second)
    damaged = second / library.name
    garble(damaged)
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(second))
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING, logger=native.logger.name):
        assert native.available()
        assert native.available()
    lines = [r.getMessage() for r in caplog.records if r.name == native.logger.name]
    assert len(lines) == 1, lines  # once, though available() was asked twice
    assert lines[0].startswith(f"piflow_kernels: the cached native build {damaged} does not verify (sha256 ")
    assert lines[0].endswith("; rebuilding it")
    assert damaged.read_bytes() == library.read_bytes()  # rebuilt with the same flags, byte for byte
    assert torch.equal(native.gm_rollout_native(x, policy, plan), before)

    # verified now: the next process loads it without a word and without the compiler
    def no_compiler(*a, **kw):
        raise AssertionError("the compiler ran again")

    caplog.clear()
    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING, logger=native.logger.name):
        assert native.available()
    assert not [r for r in caplog.records if r.name == native.logger.name]


def test_native_build_without_recorded_hash_is_rebuilt(tmp_path, monkeypatch, caplog):
    from piflow_kernels.ops.gm import native

    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    if not native.available():
        pytest.skip("no C compiler for the native CPU rollout")
    (library,) = tmp_path.glob("gm_native_*.so")
    hash_file = tmp_path / f"{library.name}.sha256"
    hash_file.unlink()  # as a build from before the cache recorded hashes
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING, logger=native.logger.name):
        assert native.available()
    (line,) = [r.getMessage() for r in caplog.records if r.name == native.logger.name]
    assert "no recorded sha256" in line and str(library) in line
    assert hash_file.read_text().strip() == files.sha256_file(library)
