"""torchrun with 2 CPU processes (gloo) gives the same weights as one process with the same global batch.

Tolerance: every saved tensor within TOLERANCE (max |difference|) of the one-process run. The two runs
sum the same per-example gradients in a different order (two half-batch means, then an all-reduce
average, against one full-batch mean), so they agree to float32 rounding, not bit for bit: measured
max |diff| about 3e-8 on these runs.

    test_cli_two_processes_match_one   the real command, mnist-lowrank (every layer trains), DDP, FSDP2
    test_lora_frozen_base_*            LoRA on a frozen base whose blocks are FSDP units mixing frozen and
                                       trainable parameters (FSDP1's "uniform requires_grad" trap);
                                       the saved adapter is gathered, full-shape; frozen weights untouched;
                                       an FSDP2 run resumed from a checkpoint ends where the unbroken one did
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker
import lorakit
from lorakit import LoraError
from lorakit.train.distributed import Dist, init_distributed
from tiny_mnist import write_idx

TOLERANCE = 1e-5
TESTS = Path(__file__).parent


def torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].numel() > 0, name
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_args(data: Path, out: Path) -> list[str]:
    return ["-m", "lorakit", "train", "--task", "mnist-lowrank", "--method", "lora-r4", "--data-dir",
            str(data), "--max-steps", "20", "--batch-size", "32", "--lr", "0.05", "--eval-every", "10",
            "--device", "cpu", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    data = write_idx(root / "idx")
    done = subprocess.run([sys.executable, *train_args(data, root / "single")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return data, load_file(str(root / "single" / "trainable.safetensors"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_cli_two_processes_match_one(parallel, mnist, tmp_path):
    data, single = mnist
    torchrun(train_args(data, tmp_path) + (["--fsdp"] if parallel == "fsdp" else []))
    diff = max_diff(single, load_file(str(tmp_path / "trainable.safetensors")))
    print(f"{parallel}: max |diff| vs one process = {diff:.3g}")
    assert diff <= TOLERANCE
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["world_size"], result["parallel"], result["rank"]) == (2, parallel, 0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]        # rank 0 alone writes


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torchrun([str(TESTS / "dist_worker.py"), str(root)])
    single = dist_worker.run(root / "single")
    return root, {n: p.detach().clone() for n, p in single.state_dict().items()}


def adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_frozen_base_matches_one_process(parallel, lora_runs, tmp_path):
    root, single_state = lora_runs
    plain = dist_worker.lora_model()
    plain.load_state_dict(single_state)
    lorakit.save_adapter(plain, tmp_path / "adapter")
    diff = max_diff(adapter(tmp_path), adapter(root / parallel))
    print(f"LoRA {parallel}: max |diff| of the adapter vs one process = {diff:.3g}")
    assert diff <= TOLERANCE

    full, initial = load_file(str(root / parallel / "full.safetensors")), dist_worker.lora_model()
    frozen = {n for n, p in initial.named_parameters() if not p.requires_grad}
    assert frozen and all(torch.equal(full[n], initial.state_dict()[n]) for n in frozen)
    trained = [n for n, p in initial.named_parameters() if p.requires_grad and ".lora." in n]
    assert any(not torch.equal(full[n], initial.state_dict()[n]) for n in trained)


def test_fsdp_resume_ends_where_the_unbroken_run_did(lora_runs):
    root, _ = lora_runs
    resumed = json.loads((root / "fsdp-resume" / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed["step"] == 12
    diff = max_diff(adapter(root / "fsdp"), adapter(root / "fsdp-resume"))
    print(f"FSDP resumed from step 4 vs unbroken: max |diff| = {diff:.3g}")
    assert diff == 0.0


def test_each_rank_takes_its_share_of_the_global_batch():
    index = torch.arange(32)
    shares = [Dist(rank=r, world=4).local(index) for r in range(4)]
    assert torch.equal(torch.cat(shares), index) and {len(s) for s in shares} == {8}
    with pytest.raises(LoraError, match="--batch-size 30 does not split over 4"):
        Dist(rank=0, world=4).check_batch(30)


def test_fsdp_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LoraError, match="launch with torchrun"):
        init_distributed("cpu", fsdp=True)
    assert not init_distributed("cpu").active
