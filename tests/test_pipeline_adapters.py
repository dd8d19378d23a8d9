"""pipelines.adapters.find_adapters: one broken adapter folder is listed with its reason, never stops the search."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import mm_subspace as mms
from mm_subspace.pipelines.adapters import find_adapters


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a blocking open() of a FIFO."""
    def expire(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _save(folder: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    mms.inject(model, mms.config_for("lora", rank=2, targets=["0"]))
    return mms.save_adapter(model, folder)


def _broken(root: Path) -> dict[str, str]:
    """Adapter folders broken in every way a folder can be; name -> what the reason must say."""
    weights, config = "adapter_model.safetensors", "adapter_config.json"
    cases = {}
    garbage = _save(root / "garbage")
    (garbage / weights).write_bytes(os.urandom(300))
    cases["garbage"] = "checksum"
    truncated = _save(root / "truncated")
    data = (truncated / weights).read_bytes()
    (truncated / weights).write_bytes(data[: len(data) // 2])
    cases["truncated"] = "checksum"
    fifo_weights = _save(root / "fifo_weights")
    (fifo_weights / weights).unlink()
    os.mkfifo(fifo_weights / weights)
    cases["fifo_weights"] = "FIFO"
    fifo_config = _save(root / "fifo_config")
    (fifo_config / config).unlink()
    os.mkfifo(fifo_config / config)
    cases["fifo_config"] = "FIFO"
    folder_config = _save(root / "folder_config")
    (folder_config / config).unlink()
    (folder_config / config).mkdir()
    cases["folder_config"] = "a folder"
    device = _save(root / "device_weights")
    (device / weights).unlink()
    (device / weights).symlink_to("/dev/zero")
    cases["device_weights"] = "character device"
    dangling = _save(root / "dangling_config")
    (dangling / config).unlink()
    (dangling / config).symlink_to(root / "nowhere.json")
    cases["dangling_config"] = "no adapter_config.json"
    return cases


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_broken_adapter_folders_are_listed_with_their_reason_and_the_good_one_loads(tmp_path):
    _save(tmp_path / "good")
    cases = _broken(tmp_path)
    with deadline(60):
        infos = {info.name: info for info in find_adapters([tmp_path])}
    assert set(infos) == {"good", *cases}
    assert infos["good"].compatible and infos["good"].params == 2 * 6 + 6 * 2  # lora_A (2x6) + lora_B (6x2)
    for name, reason in cases.items():
        assert not infos[name].compatible, name
        assert reason in infos[name].reason, (name, infos[name].reason)
    model = nn.Sequential(nn.Linear(6, 6))
    assert mms.load_adapter(model, infos["good"].path) == "default"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_in_place_of_an_adapter_file_is_refused_by_every_reader(tmp_path):
    cases = _broken(tmp_path)
    model = nn.Sequential(nn.Linear(6, 6))
    with deadline(60):
        for name in ("fifo_weights", "fifo_config", "folder_config", "device_weights"):
            with pytest.raises(mms.AdapterFileError, match="not a regular file"):
                mms.load_adapter(model, tmp_path / name)
            with pytest.raises(mms.AdapterFileError, match="not a regular file"):
                mms.describe_adapter(tmp_path / name)
        assert not mms.list_adapters(model) and len(cases) == 7


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_saving_over_a_fifo_config_does_not_block(tmp_path):
    folder = _save(tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    (folder / ".adapter_model.safetensors.tmp-999999999-0123abcd").write_bytes(b"leftover of a dead writer")
    with deadline(60):
        _save(folder)
        assert mms.load_adapter(nn.Sequential(nn.Linear(6, 6)), folder) == "default"


def test_unlistable_folder_is_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    _save(tmp_path / "good")
    (tmp_path / "locked").mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with caplog.at_level("WARNING"):
        infos = find_adapters([tmp_path])
    assert [i.name for i in infos] == ["good"]
    assert "locked" in caplog.text and "Permission denied" in caplog.text
