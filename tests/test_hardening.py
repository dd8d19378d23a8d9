"""Reliability hardening (issue 15): one regression test per item of the issue, plus a
kill-at-every-point test of the save protocol.

Each test is written from the issue's description of what went wrong; the helpers check the
"failed call changes nothing" contract (state dict, requires_grad flags, module tree).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import mm_subspace as mms
import mm_subspace.io as io
from mm_subspace.errors import AdapterFileError, AdapterStateError, ConfigError, SubspaceError
from mm_subspace.io import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
FEW = settings(max_examples=40, derandomize=True, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))


def adapted(seed: int = 0, **kw) -> nn.Sequential:
    m = net()
    torch.manual_seed(seed + 100)
    mms.inject(m, mms.MoSLoRAConfig(rank=4, alpha=8, targets=["0", "2"], init_weights=False, **kw))
    return m


def snapshot(model: nn.Module) -> tuple:
    """Everything a failed call must leave as it was: tensors, requires_grad flags, module tree, adapters."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: c.to_dict() for k, c in mms.list_adapters(model).items()},
    )


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert after[0].keys() == before[0].keys() and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert after[1] == before[1], "requires_grad flags changed"
    assert after[2] == before[2], "module tree changed"
    assert after[3] == before[3], "adapters changed"


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- 1 + 2: the save protocol, killed between every pair of file operations ----------------------------
def newer() -> nn.Sequential:
    m = adapted(seed=1)
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(m):
            adapter.lora_B.add_(1.0)
    return m


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = mms.adapter_state_dict(a), mms.adapter_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates SIGKILL with fork + os._exit")
def test_save_killed_between_every_pair_of_file_operations(tmp_path, monkeypatch):
    """Issue 15.1 + 15.2: a kill at any point leaves the last complete save loadable bit-exact (the old
    one before the config's rename, the new one after), and the next save leaves no leftovers."""
    old, new = adapted(), newer()
    folder = tmp_path / "ckpt"
    labels: list[str] = []
    monkeypatch.setattr(io, "_fs_step", labels.append)
    mms.save_adapter(old, folder)
    monkeypatch.setattr(io, "_fs_step", lambda label: None)
    commit = labels.index(f"replace {CONFIG_NAME}")
    assert labels.index(f"replace {WEIGHTS_NAME}") < commit  # two renames: the kill of the issue is possible
    for point in range(len(labels)):
        mms.save_adapter(old, folder)
        pid = os.fork()
        if pid == 0:  # child: die like SIGKILL (no finally, no cleanup) before operation `point`
            count = [0]

            def step(label: str) -> None:
                if count[0] == point:
                    os._exit(0)
                count[0] += 1

            io._fs_step = step
            try:
                mms.save_adapter(new, folder)
            finally:
                os._exit(3)  # the kill point was never reached
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, f"kill point {point} ({labels[point]}) not reached"
        fresh = net()
        mms.load_adapter(fresh, folder)
        expected = old if point <= commit else new
        assert _states_equal(fresh, expected), f"killed before {labels[point]!r}: loaded neither the last complete save"
        # the next save repairs and removes every leftover of ours
        mms.save_adapter(new, folder)
        assert files(folder) == sorted([CONFIG_NAME, WEIGHTS_NAME]), f"leftovers after kill at {labels[point]!r}"
        fresh = net()
        mms.load_adapter(fresh, folder)
        assert _states_equal(fresh, new)


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    """Issue 15.2: hidden .tmp/.old files of dead processes never pile up; a live writer's are kept."""
    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    junk = [folder / f".{WEIGHTS_NAME}.tmp-{dead}-0123abcd", folder / f".{WEIGHTS_NAME}.tmp-{dead}-0123abcd.old",
            folder / f".{CONFIG_NAME}.tmp-{dead}-89abcdef"]
    for path in junk:
        path.write_bytes(b"x" * 1000)
    live = folder / f".{WEIGHTS_NAME}.tmp-{os.getpid()}-00000000"
    live.write_bytes(b"in progress")
    mine = folder / "notes.txt"  # not our naming: never touched
    mine.write_text("keep")
    mms.save_adapter(newer(), folder)
    assert files(folder) == sorted([CONFIG_NAME, WEIGHTS_NAME, live.name, mine.name])


# -- 7: per-row routing through sequence-first layers -------------------------------------------------------
def _routing_matches_single_runs(model: nn.Module, x: torch.Tensor, rows: list, batch_dim: int) -> None:
    with torch.no_grad():
        single = {}
        for name in ("a", "b"):
            mms.set_adapter(model, name)
            single[name] = model(x)
        with mms.disable_adapters(model):
            single[None] = model(x)
        with mms.forward_context(model, adapter_rows=rows):
            mixed = model(x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed.select(batch_dim, i), single[name].select(batch_dim, i), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single["a"], single["b"])


@pytest.mark.parametrize("batch_first", [False, True])
def test_routing_through_sequence_first_transformer_layer(batch_first):
    """Issue 15.7: nn.TransformerEncoderLayer(batch_first=False) feeds (seq, batch, d) to its linears; rows must
    still be routed by batch row, not by sequence position."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)).eval()
    for name, method in (("a", "moslora"), ("b", "lora")):
        torch.manual_seed(len(name) + ord(name))
        mms.inject(model, mms.config_for(method, rank=2, targets=["linear1", "linear2", "self_attn"], init_weights=False),
                   adapter_name=name)
    x = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(2))  # (seq 5, batch 4) or (batch 5, seq 4)
    rows = ["a", "b", None, "a"] if not batch_first else ["a", "b", None, "a", "b"]
    _routing_matches_single_runs(model, x, rows, batch_dim=0 if batch_first else 1)


def test_routing_through_open_clip_sequence_first_transformer():
    from open_clip.transformer import Transformer

    torch.manual_seed(0)
    model = nn.Sequential(Transformer(16, 2, 2, batch_first=False)).eval()  # takes (batch, seq, d), blocks see (seq, batch, d)
    for name in ("a", "b"):
        torch.manual_seed(ord(name))
        mms.inject(model, mms.LoraConfig(rank=2, targets=["c_fc", "c_proj", "attn"], init_weights=False), adapter_name=name)
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(2))
    _routing_matches_single_runs(model, x, ["a", "b", None], batch_dim=0)
