"""Shared fixtures."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models run several times faster on one thread than on two
    on a loaded 2-core machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, lr: float, steps: int = 30) -> tuple[float, float]:
    """``steps`` Adam steps of MSE on the trainable parameters; returns (first loss, last loss)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), target)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


@pytest.fixture
def fit():
    """The regression training loop shared by the per-method "30 steps reduce the loss" tests."""
    return _fit


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether a transformers model has activation checkpointing on (the transformers 5 name, or the old one)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def kill_at_first_checkpoint(cmd: list[str], output_dir: Path, timeout: float = 300, env: dict | None = None) -> None:
    """Run a training command until it has written ``checkpoint-1``, SIGKILL it, and keep only that checkpoint
    (as if the process died right after it): the start of the bit-exact resume tests."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpt = output_dir / "checkpoint-1"
    deadline = time.time() + timeout
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.is_dir(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for path in output_dir.iterdir():  # later checkpoints, or one half-written (.checkpoint-2.tmp)
        if re.fullmatch(r"\.?checkpoint-\d+(\.tmp)?", path.name) and path.name != "checkpoint-1":
            shutil.rmtree(path)


def run_two_cpu_processes(script: Path, args: list[str], env: dict | None = None, timeout: float = 600) -> tuple[str, str]:
    """``accelerate launch`` ``script`` on 2 CPU processes (gloo, as docs/ENVIRONMENT say); assert it succeeds and
    both ranks end with the same adapter digest; return the combined log and that digest."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    digests = dict(re.findall(r"rank (\d) adapter digest ([0-9a-f]{16})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    assert "adapters identical on all 2 ranks" in log
    return log, digests["0"]


def draw_triangles(folder: Path, n: int = 5, size: int = 64) -> Path:
    """``n`` hollow triangles (black on white, ``size`` px, shifted and thinned a little each): a subject that is
    no digit, as a user's own small images would be."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        dx, dy, inset = (i % 3 - 1) * 2, (i // 3 - 1) * 2, 4 + i % 2
        corners = [(size / 2 + dx, 10 + dy), (size - 10 + dx - inset, size - 12 + dy), (10 + dx + inset, size - 12 + dy)]
        ImageDraw.Draw(image).polygon(corners, outline="black", width=size // 10)
        image.save(folder / f"triangle_{i}.png")
    return folder
