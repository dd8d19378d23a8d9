"""mm_subspace.checkpoints: a checkpoint folder is read without running code, and every broken file is named."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from mm_subspace.checkpoints import TRAINER_STATE, check_accelerate_files, load_torch_state, read_trainer_state
from mm_subspace.errors import AdapterFileError


def _write_state(folder, content: bytes | str) -> None:
    folder.mkdir(exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    (folder / TRAINER_STATE).write_bytes(data)


def test_trainer_state_round_trip(tmp_path):
    state = {"step": 3, "method": "moslora", "loss_history": [{"step": 1, "loss": 0.5, "lr": 1e-4}],
             "skipped_steps": {"total": 2, "consecutive": 1}}
    _write_state(tmp_path / "c", json.dumps(state))
    assert read_trainer_state(tmp_path / "c") == state


@pytest.mark.parametrize(("content", "says"), [
    ("[1, 2]", "must hold a JSON object, found list"),
    ('{"method": "lora"}', "'step' is missing"),
    ('{"step": true, "method": "lora"}', "'step' is missing or not an integer"),
    ('{"step": -1, "method": "lora"}', "not an integer >= 0"),
    ('{"step": 2}', "'method' is missing"),
    (b'{"step": 2, "method": "lo\xff"}', "is not UTF-8 text"),
    ('{"step": 2, "method": "lora"', "is not valid JSON"),
    ("[" * 100_000, "is not valid JSON"),
    ('{"step": 1' + "0" * 5000 + ', "method": "lora"}', "is not valid JSON"),
    ('{"step": 2, "method": "lora", "loss_history": {"rows": []}}', "'loss_history' must be a list"),
    ('{"step": 2, "method": "lora", "loss_history": [{"step": 1, "loss": NaN}]}', r"loss_history\[0\]"),
    ('{"step": 2, "method": "lora", "loss_history": [{"loss": 1.0}]}', r"loss_history\[0\]"),
    ('{"step": 2, "method": "lora", "skipped_steps": [3, 1]}', "'skipped_steps' must be"),
    ('{"step": 2, "method": "lora", "skipped_steps": {"total": 1, "consecutive": 2}}', "0 <= consecutive <= total"),
    ('{"step": 2, "method": "lora", "skipped_steps": {"total": -1, "consecutive": 0}}', "'skipped_steps' must be"),
    ('{"step": 2, "method": "lora", "skipped_steps": {"total": 1.5, "consecutive": 0}}', "'skipped_steps' must be"),
])
def test_broken_trainer_state_names_the_file(tmp_path, content, says):
    _write_state(tmp_path / "checkpoint-2", content)
    with pytest.raises(AdapterFileError, match=says) as info:
        read_trainer_state(tmp_path / "checkpoint-2")
    assert str(tmp_path / "checkpoint-2" / TRAINER_STATE) in str(info.value)


def test_missing_or_fifo_trainer_state(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(AdapterFileError, match=f"has no {TRAINER_STATE}: it is not a complete checkpoint"):
        read_trainer_state(tmp_path / "c")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "c" / TRAINER_STATE)
        with pytest.raises(AdapterFileError, match="FIFO"):
            read_trainer_state(tmp_path / "c")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "optimizer.bin"
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCode(str(marker))}, path)
    says = r"optimizer.bin cannot be read as tensors \(UnpicklingError: Weights only load failed\).*\(never unpickled\)$"
    with pytest.raises(AdapterFileError, match=says):
        load_torch_state(path)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(AdapterFileError, match="plain.pkl cannot be read as tensors"):
        load_torch_state(plain)
    assert not marker.exists()


def test_accelerate_files_load_and_a_truncated_optimizer_is_named(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.save(opt.state_dict(), tmp_path / "optimizer.bin")
    torch.save(sched.state_dict(), tmp_path / "scheduler.bin")
    random.seed(1)
    np.random.seed(1)
    rng = {"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
           "torch_manual_seed": torch.get_rng_state()}
    torch.save(rng, tmp_path / "random_states_0.pkl")
    check_accelerate_files(tmp_path)
    loaded = load_torch_state(tmp_path / "optimizer.bin")
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert load_torch_state(tmp_path / "random_states_0.pkl")["random_state"] == rng["random_state"]
    data = (tmp_path / "optimizer.bin").read_bytes()
    (tmp_path / "optimizer.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match=r"optimizer.bin cannot be read as tensors .*truncated"):
        check_accelerate_files(tmp_path)
    (tmp_path / "optimizer.bin").unlink()
    with pytest.raises(AdapterFileError, match="optimizer.bin is missing"):
        check_accelerate_files(tmp_path)


def test_the_refused_pickle_would_have_run_code(tmp_path):
    """The guard above is real: a full unpickle of the same payload does create the marker."""
    marker = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(_RunsCode(str(marker)))).close()
    assert marker.exists()


def test_no_shipped_code_registers_state_that_accelerate_would_pickle():
    """accelerate's register_for_checkpointing saves custom state as a pickle and loads it with a full unpickle."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("mm_subspace", "training", "pipelines", "apps"):
        for path in sorted((repo / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr in ("register_for_checkpointing", "load_custom_state"):
                    offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert not offenders, offenders
