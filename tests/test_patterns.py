"""Patterns read from config files (mm_subspace.patterns): matched with a timeout and a length limit, so a
pathological rank_pattern can neither hang a loader nor escape as anything but a ConfigError."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import ConfigError, SubspaceError
from mm_subspace.io import CONFIG_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL = r"(x+x+)+y"  # exponential backtracking in Python's re on a long run of x


def long_named_net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.add_module("x" * 40, nn.Linear(12, 16))
    return m


def _in_child(fn, timeout: float = 60.0) -> str:
    """Run ``fn()`` in a forked child; return what it reported ('ok', an exception type name, or 'hung')."""
    import signal
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            fn()
            result = "ok"
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            result = f"{type(err).__name__}:{isinstance(err, SubspaceError)}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            out = os.read(read, 200).decode()
            os.close(read)
            return out
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read)
    return "hung"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="hang guard runs the load in a forked child")
def test_pathological_patterns_in_files_do_not_hang_loaders(tmp_path):
    """load_adapter, import_peft and inspect with a catastrophic-backtracking rank_pattern."""
    from mm_subspace.cli import main

    model = long_named_net()
    mms.inject(model, mms.LoraConfig(rank=2, alpha=4, targets=["x" * 40], init_weights=False))
    mms.save_adapter(model, tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    meta["config"]["rank_pattern"] = {EVIL: 3}
    (tmp_path / "ours" / CONFIG_NAME).write_text(json.dumps(meta))
    mms.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {EVIL: 3}
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    for what, fn in [("load_adapter", lambda: mms.load_adapter(long_named_net(), tmp_path / "ours")),
                     ("import_peft", lambda: mms.import_peft(long_named_net(), tmp_path / "peft")),
                     ("inspect", lambda: main(["inspect", str(tmp_path / "ours")]))]:
        result = _in_child(fn)
        assert result != "hung", f"{what} hung on rank_pattern {EVIL!r}"
        assert result == "ok" or result.endswith(":True"), f"{what} raised a non-SubspaceError: {result}"


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(pattern=st.text(alphabet="x()+*?|.{}[]^$\\1,yz", max_size=24))
def test_any_pattern_either_matches_or_raises_config_error(pattern):
    """Whatever a rank_pattern key is, building the config and looking up a rank ends, with a value or a ConfigError."""
    try:
        config = mms.LoraConfig(rank=2, rank_pattern={pattern: 3})
        assert config.rank_for("x" * 30) in (2, 3)
    except ConfigError:
        pass


def test_overlong_pattern_is_refused():
    with pytest.raises(ConfigError, match="at most 1000"):
        mms.LoraConfig(rank_pattern={"a" * 1001: 2})
