"""A writer SIGKILLed while it saves ``last.ckpt``: what is left on disk, with Lightning's
``TorchCheckpointIO`` and with :class:`lightning_localsgd.checkpoint_io.AtomicCheckpointIO`.

A child process overwrites a good 192 MB checkpoint (every value 1.0) with a new one (every value
2.0); the test polls the directory and sends SIGKILL at a chosen moment of the write, then loads.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_localsgd.checkpoint_io import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
N = 48 * 1024 * 1024  # float32 values: 192 MB, long enough a write to be caught in the middle
WRITER = """
import sys, torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_localsgd.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO() if sys.argv[1] == "atomic" else TorchCheckpointIO()
ckpt = {"state_dict": {"w": torch.full((int(sys.argv[3]),), 2.0)}}
print("ready", flush=True)
sys.stdin.readline()
io.save_checkpoint(ckpt, sys.argv[2])
"""


def write_and_kill(io_name: str, target: Path, tmpdir: Path, kill_when: str) -> None:
    """Start the writer, let it save, SIGKILL it when ``kill_when`` is seen, wait for it."""
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, io_name, str(target), str(N)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = target.stat()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_when == "target_truncated":  # the target is being rewritten in place
                st = target.stat()
                if st.st_ino == before.st_ino and 0 < st.st_size < before.st_size and st.st_mtime != before.st_mtime:
                    break
            elif kill_when == "temp_half_written":  # a temporary file next to the target is half written
                temps = [p for p in target.parent.iterdir() if p.name != target.name]
                if any(p.stat().st_size > 2 * N for p in temps if p.exists()):
                    break
            time.sleep(0.0005)
        else:
            pytest.fail(f"the writer finished before {kill_when!r} was seen (rc {proc.returncode})")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def good_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.full((N,), 1.0)}}, path)


def loaded_value(path: Path) -> float:
    w = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert w.numel() == N and bool((w == w[0]).all())
    return float(w[0])


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's tmp_path")
    d = shm / f"ckpt-io-test-{os.getpid()}"
    d.mkdir()
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def test_lightning_tmpdir_on_another_filesystem_leaves_a_torn_last_ckpt(tmp_path: Path, other_filesystem) -> None:
    target = tmp_path / "last.ckpt"
    good_checkpoint(target)
    write_and_kill("lightning", target, other_filesystem, "target_truncated")
    with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):  # a torn file: neither old nor new
        torch.load(target, weights_only=True)


def test_atomic_io_killed_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, other_filesystem) -> None:
    target = tmp_path / "last.ckpt"
    good_checkpoint(target)
    write_and_kill("atomic", target, other_filesystem, "temp_half_written")
    assert loaded_value(target) == 1.0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers == [".last.ckpt.tmp-" + leftovers[0].rsplit("-", 1)[-1]]  # the killed writer's temp file
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((N,), 3.0)}}, target)
    assert loaded_value(target) == 3.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the next save removed the leftover


def test_atomic_io_through_a_trainer(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from tests.models import LeastSquares

    x = torch.arange(8, dtype=torch.float64).reshape(4, 2) / 8
    y = x @ torch.tensor([1.0, -2.0], dtype=torch.float64)
    model = LeastSquares(d=2, lr=0.5)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    w = torch.zeros(2, dtype=torch.float64)  # three full-batch gradient steps by hand
    for _ in range(3):
        w = w - 0.5 * (x.T @ (x @ w - y)) / 4
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]["w"]
    assert torch.equal(saved, w) and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
