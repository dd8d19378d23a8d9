"""MoSLoRA mixer inits: the statistics each name promises, and the scale the mixer gives B·M·A (docs/methods.md)."""

from __future__ import annotations

import math

import pytest
import torch

import mm_subspace as mms
from mm_subspace.methods.moslora import init_mixer

R = 256


def mixer(kind: str, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return init_mixer(kind, R, {"dtype": torch.float32, "device": torch.device("cpu")})


@pytest.mark.parametrize(("kind", "std"), [("kaiming_uniform", 1 / math.sqrt(3 * R)), ("kaiming_unit", 1 / math.sqrt(R)),
                                           ("normal", 1 / math.sqrt(R)), ("normal_unit", 1.0)])
def test_mixer_init_std(kind, std):
    m = mixer(kind)
    assert abs(m.std().item() / std - 1) < 0.02, (kind, m.std().item(), std)
    assert abs(m.mean().item()) < 0.02 * std * 10


def test_paper_kaiming_is_official_kaiming_uniform_a_sqrt5_exactly():
    torch.manual_seed(0)
    expect = torch.nn.init.kaiming_uniform_(torch.empty(R, R), a=math.sqrt(5))
    assert torch.equal(mixer("kaiming_uniform"), expect)
    torch.manual_seed(0)
    unit = torch.nn.init.kaiming_uniform_(torch.empty(R, R), a=1.0)
    assert torch.equal(mixer("kaiming_unit"), unit)


def test_paper_kaiming_mixer_shrinks_the_features_by_0_58():
    """‖M h‖ / ‖h‖ ≈ √(r · 1/(3r)) = 0.577 for the paper's Kaiming mixer, ≈ 1 for the unit-variance inits."""
    h = torch.randn(R, 1000, generator=torch.Generator().manual_seed(1))
    gain = {k: ((mixer(k) @ h).norm() / h.norm()).item() for k in ("kaiming_uniform", "kaiming_unit", "orthogonal", "normal")}
    assert abs(gain["kaiming_uniform"] - 1 / math.sqrt(3)) < 0.02
    assert abs(gain["orthogonal"] - 1) < 1e-4
    assert abs(gain["kaiming_unit"] - 1) < 0.02 and abs(gain["normal"] - 1) < 0.02


def test_default_mixer_is_orthogonal():
    assert mms.MoSLoRAConfig().mixer_init == "orthogonal"
