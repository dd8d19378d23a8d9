"""mm_subspace.atomic: file modes of atomic writes."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace import atomic


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_saved_weights_and_config_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    assert atomic.current_umask() == mask
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    mms.inject(model, mms.config_for("lora", rank=2, targets=["0"]))
    mms.save_adapter(model, tmp_path / "a")
    with open(tmp_path / "plain", "w"):
        pass
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~mask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()}
    assert modes == {"adapter_model.safetensors": expected, "adapter_config.json": expected}
    atomic.atomic_write_text(tmp_path / "note.txt", "x")
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == expected
