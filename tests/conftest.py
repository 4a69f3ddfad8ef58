"""Tiny models shared by the tests: every LoRA layer type in one module, small enough for CPU."""

import pytest
import torch
from torch import nn


class Conv1D(nn.Module):
    """The shape of transformers' Conv1D (weight stored (in, out)), without importing transformers."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d, bias=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.c_fc = Conv1D(2 * d, d)
        self.out = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = self.norm(h + self.query(h) + self.value(h) + q * torch.sigmoid(k) + v)
        return h + self.out(torch.relu(self.c_fc(h)))


class TinyNet(nn.Module):
    """Embedding -> Conv1d -> 2 blocks -> Conv2d over (d x seq) -> classifier."""

    def __init__(self, vocab: int = 20, d: int = 16, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, kernel_size=3, padding=1)
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.conv2d = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.classifier = nn.Linear(2 * d, classes)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        for block in self.layers:
            h = block(h)
        img = self.conv2d(h.unsqueeze(1))                       # (b, 2, seq, d)
        return self.classifier(img.mean(dim=2).flatten(1))


ALL_TARGETS = ["embed", "conv", "query", "value", "qkv", "c_fc", "out", "conv2d"]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def ids():
    return torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA factor non-zero values (B starts at zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False); `make gpu-check` runs it on a GPU"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped only where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def pytest_sessionfinish(session, exitstatus):
    """With LORAKIT_NO_SKIPS=1 (set by scripts/run_tests.sh, so in CI) a skipped test fails the run:
    every optional package is installed by `make setup`, so a skip there means a broken install.
    The one exception is a ``cuda`` test on a machine without CUDA (run_tests.sh deselects those)."""
    import os

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    skipped = [report for report in skipped if NO_CUDA not in str(report.longrepr)]
    if os.environ.get("LORAKIT_NO_SKIPS") == "1" and skipped and exitstatus == 0:
        reporter.write_line(f"{len(skipped)} test(s) skipped under LORAKIT_NO_SKIPS=1: a package "
                            "that `make setup` installs is missing", red=True)
        session.exitstatus = 1


def tiny_bert(cls_name: str = "BertModel", **overrides):
    """A tiny random Hugging Face BERT (2 layers, 32 wide, vocab 100; no download). Seed it first."""
    import transformers
    config = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 32, **overrides}
    return getattr(transformers, cls_name)(transformers.BertConfig(**config))
