"""Every registered method trains: 30 Adam steps on a tiny seeded digits classifier reduce the loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_subspace as mms

#: methods that need something other than the defaults below (lr 1e-2, rank 4, fc1 + fc2)
#: the reconstruction methods train a few scaling/bias/singular-value vectors: they take a larger lr;
#: BitFit (biases only, on a random base) can move the loss least, so it must only beat 0.98×
SPECIAL: dict[str, dict] = {name: {"lr": 0.1} for name in ("bitfit", "ia3", "sam_parser", "ssb", "ssl", "svdiff")}
SPECIAL["bitfit"]["max_ratio"] = 0.98


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:256], dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target[:256])


@pytest.mark.parametrize("method", mms.list_methods())
def test_thirty_adam_steps_reduce_the_loss(method, digits):
    x, y = digits
    special = dict(SPECIAL.get(method, {}))
    lr = special.pop("lr", 1e-2)
    max_ratio = special.pop("max_ratio", 0.9)
    torch.manual_seed(0)
    model = MLP()
    mms.inject(model, mms.config_for(method, **{"rank": 4, "targets": ["fc1", "fc2"], **special}))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, f"{method} has no trainable parameters"
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with torch.no_grad():
        start = loss_fn(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), y) + mms.aux_loss(model)
        loss.backward()
        opt.step()
    mms.aux_loss(model)
    with torch.no_grad():
        end = loss_fn(model(x), y).item()
    assert torch.isfinite(torch.tensor(end))
    assert end < max_ratio * start, f"{method}: loss {start:.4f} -> {end:.4f}"
