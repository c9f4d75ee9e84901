"""SIGKILL during a checkpoint save: the run resumes from a complete checkpoint, bit for bit.

A training run in a child process checkpoints every iteration and is killed (SIGKILL: no ``finally``, no
atexit, no flush) at a chosen point of its second save: while a file of the staging folder is half written,
before the staging folder is renamed into place, while ``latest`` is half rewritten, and just after the save
completed. The parent then resumes the run in-process and trains to the end: the final student, EMA and
optimizer state equal those of a run that was never killed, and no staging or temporary file is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_trainer import make_trainer, small_config, state_of

from piflow_kernels.distill import checkpoint as ckpt
from piflow_kernels.distill.config import TrainConfig
from piflow_kernels.distill.trainer import Trainer

MAX_ITERS = 4

# The child: os.replace is how every checkpoint file, the staging folder and ``latest`` move into place; the
# wrapper kills the process at the chosen one of the save of iteration 2 (iteration 1's save is complete).
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path

    import torch

    from piflow_kernels.distill.config import TrainConfig
    from piflow_kernels.distill.trainer import Trainer

    cfg, point = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    root = Path(cfg["out_dir"]) / "checkpoints"
    real_replace = os.replace

    def kill(torn=None):
        if torn is not None:  # a write cut short: the temporary file holds half its bytes
            data = Path(torn).read_bytes()
            Path(torn).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def replace(src, dst, *args, **kwargs):
        dst = Path(dst)
        second_save_done = (root / "iter_00000002").is_dir()
        if point == "torn-state" and dst.parent.name == ".iter_00000002.partial" and dst.name == "state.pt":
            kill(torn=src)
        if point == "before-rename" and dst.name == "iter_00000002":
            kill()
        if point == "torn-latest" and dst.name == "latest" and second_save_done:
            kill(torn=src)
        real_replace(src, dst, *args, **kwargs)
        if point == "after-save" and dst.name == "latest" and second_save_done:
            kill()

    os.replace = replace
    torch.set_num_threads(1)
    with Trainer(TrainConfig.from_dict(cfg)) as trainer:
        trainer.train()
    """
)

# point -> the checkpoint the resumed run continues from
POINTS = {
    "torn-state": "iter_00000001",
    "before-rename": "iter_00000001",
    "torn-latest": "iter_00000001",
    "after-save": "iter_00000002",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final state of the same run, never killed."""
    out = tmp_path_factory.mktemp("whole")
    with make_trainer(out, max_iters=MAX_ITERS, ckpt_every=1) as trainer:
        trainer.train()
        return state_of(trainer)


@pytest.mark.parametrize("point", list(POINTS))
def test_sigkill_during_save_resumes_bit_exactly(tmp_path, uninterrupted, point):
    cfg = small_config(tmp_path / "run", max_iters=MAX_ITERS, ckpt_every=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "child.py").write_text(CHILD)
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's package, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "config.json"), point],
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    root = tmp_path / "run" / "checkpoints"
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    if point in ("torn-state", "torn-latest"):
        assert leftovers, "the kill should have left the half-written file behind"
    assert ckpt.latest_checkpoint(root).name == POINTS[point]

    with Trainer(TrainConfig.from_dict(cfg)) as resumed:
        assert resumed.resume() and resumed.iteration == int(POINTS[point][-1])
        resumed.train()
        final = state_of(resumed)
    assert final.keys() == uninterrupted.keys()
    for key, value in final.items():
        assert torch.equal(value, uninterrupted[key]), key
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert (root / "latest").read_text() == f"iter_{MAX_ITERS:08d}"
    assert ckpt.verify_checkpoint(root / f"iter_{MAX_ITERS:08d}") is True
