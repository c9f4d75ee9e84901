"""Resuming past damage: the newest checkpoint that verifies is used, bit-exactly; killed saves are cleaned up.

A run checkpoints every iteration; its newest checkpoint is then damaged (a truncated ``state.pt``,
``student.safetensors`` or ``rng_rank0.pt``, a garbled one, a missing file, a checkpoint whose manifest
is gone). ``resume()`` must warn naming the folder it skips and why, and continue from the one before:
bit for bit as a run resumed from that checkpoint directly. Toy students on the CPU, one thread.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from test_trainer import make_trainer, state_of

from piflow_kernels.distill import checkpoint as ckpt
from piflow_kernels.files import DamagedFileError, sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A run that stopped at iteration 3 after checkpointing iterations 1, 2 and 3."""
    out = tmp_path_factory.mktemp("run")
    with make_trainer(out, max_iters=3, ckpt_every=1, keep_checkpoints=3) as trainer:
        trainer.train()
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGES = {
    "state.pt-truncated": ("state.pt", truncate, "state.pt: training state: "),
    "student-truncated": ("student.safetensors", truncate, "student.safetensors: student weights: "),
    "rng-truncated": ("rng_rank0.pt", truncate, "rng_rank0.pt: RNG state: "),
    "ema-one-byte-flipped": ("ema.safetensors", flip_one_byte, "ema.safetensors: EMA weights: its sha256 differs"),
    "state.pt-missing": ("state.pt", lambda p: p.unlink(), "state.pt does not exist (training state)"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_past_a_damaged_latest_checkpoint_bit_exactly(tmp_path, three_checkpoints, damage):
    name, spoil, needle = DAMAGES[damage]
    damaged_run = copy_run(three_checkpoints, tmp_path / "damaged")
    direct_run = copy_run(three_checkpoints, tmp_path / "direct")
    newest = damaged_run / "checkpoints" / "iter_00000003"
    assert (damaged_run / "checkpoints" / "latest").read_text() == newest.name
    spoil(newest / name)

    resumed = make_trainer(damaged_run, max_iters=5)
    with pytest.warns(UserWarning) as caught:
        assert resumed.resume()
    messages = [str(w.message) for w in caught]
    assert any(f"skipping checkpoint {newest}" in m and needle in m for m in messages), messages
    assert resumed.iteration == 2
    resumed.train()

    direct = make_trainer(direct_run, max_iters=5)
    direct.resume(direct_run / "checkpoints" / "iter_00000002")
    direct.train()
    a, b = state_of(resumed), state_of(direct)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert resumed.lr_scheduler.state_dict() == direct.lr_scheduler.state_dict()
    resumed.close()
    direct.close()
    assert ckpt.latest_checkpoint(damaged_run / "checkpoints").name == "iter_00000005"


def test_each_skipped_checkpoint_is_named_and_all_damaged_is_an_error(tmp_path, three_checkpoints):
    run = copy_run(three_checkpoints, tmp_path / "run")
    root = run / "checkpoints"
    truncate(root / "iter_00000003" / "state.pt")
    truncate(root / "iter_00000002" / "student.safetensors")
    with pytest.warns(UserWarning) as caught:
        assert ckpt.latest_checkpoint(root) == root / "iter_00000001"
    skipped = [str(w.message) for w in caught if "skipping checkpoint" in str(w.message)]
    assert len(skipped) == 2
    assert f"{root / 'iter_00000003'}: {root / 'iter_00000003' / 'state.pt'}: training state:" in skipped[0]
    assert f"{root / 'iter_00000002'}: {root / 'iter_00000002' / 'student.safetensors'}: student weights:" in skipped[1]

    truncate(root / "iter_00000001" / "ema.safetensors")
    with pytest.warns(UserWarning), pytest.raises(DamagedFileError) as info:
        ckpt.latest_checkpoint(root)
    assert str(info.value).startswith(f"{root}: no checkpoint under it verifies (")
    assert "iter_00000001" in str(info.value)
    with pytest.warns(UserWarning), pytest.raises(DamagedFileError):
        make_trainer(run, max_iters=5).resume()  # rather than a fresh start that would overwrite them


def test_a_garbled_latest_marker_is_ignored_with_a_warning(tmp_path, three_checkpoints):
    run = copy_run(three_checkpoints, tmp_path / "run")
    root = run / "checkpoints"
    (root / "latest").write_bytes(b"\xff\xfe\x00")
    with pytest.warns(UserWarning, match=r"ignoring .*latest: .*checkpoint marker: not UTF-8 text"):
        assert ckpt.latest_checkpoint(root) == root / "iter_00000003"
    (root / "latest").write_text("../elsewhere")
    with pytest.warns(UserWarning, match="which is not a checkpoint folder"):
        assert ckpt.latest_checkpoint(root) == root / "iter_00000003"


def test_checkpoint_without_manifest_resumes_with_a_warning(tmp_path, three_checkpoints):
    """Checkpoints written before manifests: accepted when their files pass the structural check."""
    run = copy_run(three_checkpoints, tmp_path / "run")
    root = run / "checkpoints"
    for folder in root.glob("iter_*"):
        (folder / ckpt.MANIFEST_NAME).unlink()
    resumed = make_trainer(run, max_iters=4)
    with pytest.warns(UserWarning, match=r"iter_00000003 has no manifest\.json .* loaded without sha256 verification"):
        assert resumed.resume() and resumed.iteration == 3
    resumed.close()

    truncate(root / "iter_00000003" / "state.pt")  # an older checkpoint that is damaged too: skipped
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*iter_00000003: .*state\.pt: training state: not a complete"):
        assert ckpt.latest_checkpoint(root) == root / "iter_00000002"


def test_manifest_lists_every_file_with_size_and_sha256(three_checkpoints):
    folder = three_checkpoints / "checkpoints" / "iter_00000003"
    doc = json.loads((folder / ckpt.MANIFEST_NAME).read_text())
    assert doc["format"] == "piflow_kernels.checkpoint" and doc["version"] == 1 and doc["iteration"] == 3
    names = sorted(p.name for p in folder.iterdir() if p.name != ckpt.MANIFEST_NAME)
    assert sorted(doc["files"]) == names == ["ema.safetensors", "rng_rank0.pt", "state.pt", "student.safetensors"]
    for name, entry in doc["files"].items():
        assert entry == {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint with its manifest loads without a word
        assert ckpt.verify_checkpoint(folder) is True
        assert ckpt.load_checkpoint(folder).iteration == 3


def test_stale_partial_and_tmp_files_are_removed_by_the_next_save(tmp_path, three_checkpoints):
    run = copy_run(three_checkpoints, tmp_path / "run")
    root = run / "checkpoints"
    # what saves killed at various points leave: a staging folder (with a half-written file), a temporary marker
    stale = root / ".iter_00000004.partial"
    stale.mkdir()
    (stale / ".student.safetensors.abc123.tmp").write_bytes(b"half")
    (root / ".iter_00000009.partial").mkdir()
    (root / ".latest.xyz.tmp").write_bytes(b"iter_0000")
    keep = root / "notes.txt"
    keep.write_text("not ours to remove")

    trainer = make_trainer(run, max_iters=4, ckpt_every=1, keep_checkpoints=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stale files are no checkpoints: nothing to skip, nothing to say
        assert trainer.resume() and trainer.iteration == 3
    trainer.train()
    trainer.close()
    hidden = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert hidden == []
    assert keep.read_text() == "not ours to remove"
    assert (root / "latest").read_text() == "iter_00000004"
    assert ckpt.verify_checkpoint(root / "iter_00000004") is True


def test_pruning_after_a_fallback_keeps_the_checkpoints_this_run_made(tmp_path, three_checkpoints):
    """Resumed from 3 past a damaged 6 (an abandoned run's): the save at 4 keeps 3 and 4, the two newest of this run."""
    run = copy_run(three_checkpoints, tmp_path / "run")
    root = run / "checkpoints"
    shutil.copytree(root / "iter_00000003", root / "iter_00000006")  # a later checkpoint of an abandoned run
    truncate(root / "iter_00000006" / "state.pt")
    (root / "latest").write_text("iter_00000006")
    trainer = make_trainer(run, max_iters=4, ckpt_every=1, keep_checkpoints=2)
    with pytest.warns(UserWarning, match="skipping checkpoint .*iter_00000006"):
        assert trainer.resume() and trainer.iteration == 3
    trainer.train()
    trainer.close()
    kept = sorted(p.name for p in root.glob("iter_*"))
    assert kept == ["iter_00000003", "iter_00000004", "iter_00000006"]  # 6 stays until this run overwrites it
    assert ckpt.latest_checkpoint(root) == root / "iter_00000004"
