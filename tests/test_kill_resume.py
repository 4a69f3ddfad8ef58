"""SIGKILL at random points, then --resume: the final weights equal an uninterrupted run's, bit for bit.

The real command (``python -m lorakit train``, task mnist-lowrank on a small idx folder, a checkpoint
every step) runs in a subprocess. The test waits until a randomly chosen step has its checkpoint, sleeps
a random few milliseconds (so the kill may land in the middle of the next checkpoint's write), and
sends SIGKILL: no handler runs, nothing is flushed. Each restart uses --resume. Before the last one it
plants what a crash can leave, and worse: a ``.tmp-*`` folder and a ``step-*`` folder without COMPLETE,
both holding garbage at a later step; they must be ignored, never loaded.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train.checkpoint import complete_checkpoints
from tiny_mnist import write_idx

STEPS, KILLS, SEED = 60, 3, 20240611


def command(data: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "lorakit", "train", "--task", "mnist-lowrank", "--method", "lora-r4",
            "--data-dir", str(data), "--max-steps", str(STEPS), "--batch-size", "32", "--lr", "0.02",
            "--eval-every", "20", "--checkpoint-every", "1", "--device", "cpu", "--no-progress",
            "--out", str(out)] + (["--resume"] if resume else [])


def newest_step(out: Path) -> int:
    found = complete_checkpoints(out / "checkpoints")
    return int(found[-1].name.split("-")[1]) if found else 0


def run_and_kill(cmd: list[str], out: Path, at_step: int, delay_s: float) -> int:
    """Start ``cmd``; SIGKILL it ``delay_s`` after the checkpoint of ``at_step`` appears."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while newest_step(out) < at_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself before the kill: {err[-2000:]}"
    return newest_step(out)


def plant_wreckage(out: Path) -> None:
    """What a kill mid-write leaves (a temp folder), and a step folder missing its COMPLETE marker;
    both at a step beyond the end, full of garbage: loading either would crash or change the result."""
    for name in (f".tmp-step-{STEPS + 5:08d}-12345", f"step-{STEPS + 7:08d}"):
        folder = out / "checkpoints" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trainable.safetensors").write_bytes(b"\x00garbage" * 10)
        (folder / "state.pt").write_bytes(b"not a checkpoint")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "trainable.safetensors"))


def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path):
    data = write_idx(tmp_path / "idx")
    plain = subprocess.run(command(data, tmp_path / "reference", resume=False), capture_output=True,
                           text=True)
    assert plain.returncode == 0, plain.stderr[-2000:]

    out, rng, reached = tmp_path / "killed", random.Random(SEED), []
    for _ in range(KILLS):
        start = newest_step(out)
        target = rng.randint(start + 1, start + (STEPS - start) // 2)      # leaves steps for later kills
        reached.append(run_and_kill(command(data, out, resume=True), out, target, rng.uniform(0, 0.03)))
        torn = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-"))
        print(f"killed at/after step {target}: newest complete checkpoint {reached[-1]}, "
              f"half-written {torn or 'none'}")
    assert 0 < reached[0] and reached == sorted(reached) and reached[-1] < STEPS, reached

    plant_wreckage(out)
    done = subprocess.run(command(data, out, resume=True), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    reference, resumed = final_weights(tmp_path / "reference"), final_weights(out)
    assert sorted(reference) == sorted(resumed)
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), f"{name} differs after kill + resume"
    moved = final_weights(out)["5.weight"]
    assert not torch.equal(moved, torch.zeros_like(moved))
    assert (out / "checkpoints" / f".tmp-step-{STEPS + 5:08d}-12345").exists()    # ignored, not loaded
    history = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(history) == STEPS // 20, history             # no evaluation logged twice


@pytest.mark.parametrize("corrupt", ["trainable.safetensors", "state.pt"])
def test_complete_marker_is_what_counts(tmp_path, corrupt):
    """A folder named like a checkpoint but lacking COMPLETE is never listed, whatever it holds."""
    folder = tmp_path / "checkpoints" / "step-00000003"
    folder.mkdir(parents=True)
    (folder / corrupt).write_bytes(b"half")
    assert complete_checkpoints(tmp_path / "checkpoints") == []
    (folder / "COMPLETE").write_text("3")
    assert complete_checkpoints(tmp_path / "checkpoints") == [folder]
