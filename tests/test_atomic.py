"""The save protocol (mm_subspace.atomic, used by save_adapter): a save interrupted or killed at any point
leaves the last complete save loadable bit-exact, and the next save removes every leftover of a dead writer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import mm_subspace as mms
import mm_subspace.atomic as atomic
from conftest import adapted, disk, net
from mm_subspace.io import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))


class Crash(RuntimeError):
    pass


def crash_writer(stage: str):
    """A tensor writer that dies ``before`` writing, ``midway`` (half the bytes), or ``after`` a full write."""
    from mm_subspace.io import save_tensors

    def writer(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if stage == "before":
            raise Crash(stage)
        save_tensors(tensors, path)
        if stage == "midway":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        raise Crash(stage)

    return writer


def newer_adapter() -> nn.Sequential:
    m = adapted(seed=1)
    with torch.no_grad():
        for _, adapter in mms.iter_adapters(m):
            adapter.lora_B.add_(1.0)
    return m


# -- a save that fails part-way changes nothing ------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["before", "midway", "after", "rename-weights", "rename-config", "fsync"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, stage):
    old = adapted()
    folder = tmp_path / "ckpt"
    mms.save_adapter(old, folder)
    files = disk(folder)
    writer = crash_writer(stage) if stage in ("before", "midway", "after") else None
    if stage.startswith("rename"):
        import mm_subspace.atomic as io

        real_replace, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if Path(dst).name == {"rename-weights": WEIGHTS_NAME, "rename-config": CONFIG_NAME}[stage]:
                raise Crash(stage)
            return real_replace(src, dst)

        monkeypatch.setattr(io.os, "replace", replace)
    elif stage == "fsync":
        import mm_subspace.atomic as io

        monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(Crash("fsync")))
    with pytest.raises(Crash):
        if writer is None:
            mms.save_adapter(newer_adapter(), folder)
        else:
            mms.save_adapter(newer_adapter(), folder, _writer=writer)
    monkeypatch.undo()
    assert disk(folder) == files, f"interrupted at {stage}: files changed or temp files left behind"
    fresh = net()
    mms.load_adapter(fresh, folder)
    for key, value in mms.adapter_state_dict(old).items():
        assert torch.equal(mms.adapter_state_dict(fresh)[key], value), key
    assert torch.equal(fresh(X), old(X))


# -- killed between every pair of file operations ----------------------------------------------------------------
def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = mms.adapter_state_dict(a), mms.adapter_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates SIGKILL with fork + os._exit")
def test_save_killed_between_every_pair_of_file_operations(tmp_path, monkeypatch):
    """A kill at any point leaves the last complete save loadable bit-exact (the old
    one before the config's rename, the new one after), and the next save leaves no leftovers."""
    old, new = adapted(), newer_adapter()
    folder = tmp_path / "ckpt"
    labels: list[str] = []
    monkeypatch.setattr(atomic, "_fs_step", labels.append)
    mms.save_adapter(old, folder)
    monkeypatch.setattr(atomic, "_fs_step", lambda label: None)
    commit = labels.index(f"replace {CONFIG_NAME}")
    assert labels.index(f"replace {WEIGHTS_NAME}") < commit  # two renames: the kill of the issue is possible
    for point in range(len(labels)):
        mms.save_adapter(old, folder)
        pid = os.fork()
        if pid == 0:  # child: die like SIGKILL (no finally, no cleanup) before operation `point`
            count = [0]

            def step(label: str) -> None:  # runs in this iteration's child only
                if count[0] == point:  # noqa: B023
                    os._exit(0)
                count[0] += 1  # noqa: B023

            atomic._fs_step = step
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
    """Hidden .tmp/.old files of dead processes never pile up; a live writer's are kept."""
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
    mms.save_adapter(newer_adapter(), folder)
    assert files(folder) == sorted([CONFIG_NAME, WEIGHTS_NAME, live.name, mine.name])


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
