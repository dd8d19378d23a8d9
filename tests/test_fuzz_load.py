"""Hypothesis fuzz of ``load_adapter`` (issue 8): whatever is on disk, only documented errors escape.

Four generators, a few hundred cases in all, derandomized (same cases every run): mutated
``adapter_config.json`` values, arbitrary config text, damaged safetensors bytes, and well-formed
safetensors files with arbitrary keys / shapes / dtypes. A load either succeeds or raises a
:class:`mm_subspace.errors.SubspaceError`; after a failure the model is exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import SubspaceError
from mm_subspace.io import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(max_examples=80, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid MoSLoRA adapter folder; each example works on a copy."""
    m = net()
    torch.manual_seed(1)
    mms.inject(m, mms.MoSLoRAConfig(rank=4, alpha=8, targets=["0", "2"], init_weights=False))
    folder = tmp_path_factory.mktemp("fuzz") / "adapter"
    mms.save_adapter(m, folder)
    return folder


def attempt(template: Path, config: bytes | None = None, weights: bytes | None = None, fix_checksum: bool = True) -> None:
    """Copy ``template``, overwrite the given files, load onto a fresh model; check the contract."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "a"
        shutil.copytree(template, folder)
        if weights is not None:
            (folder / WEIGHTS_NAME).write_bytes(weights)
            if fix_checksum and config is None:
                meta = json.loads((folder / CONFIG_NAME).read_text())
                meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
                (folder / CONFIG_NAME).write_text(json.dumps(meta))
        if config is not None:
            (folder / CONFIG_NAME).write_bytes(config)
        model = net()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            mms.load_adapter(model, folder)
        except SubspaceError as err:
            assert str(err), "an error must say what is wrong"
            after = model.state_dict()
            assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
            assert not list(mms.adapter_layers(model))
        # any other exception type escapes and fails the test


json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def paths(meta: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every key path into the config JSON (top level, config fields, module signatures)."""
    out = [(k,) for k in meta]
    for top in ("config", "modules"):
        if isinstance(meta.get(top), dict):
            out += [(top, k) for k in meta[top]]
            out += [(top, k, j) for k, v in meta[top].items() if isinstance(v, dict) for j in v]
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_config_values(template, data):
    meta = json.loads((template / CONFIG_NAME).read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(paths(meta)), label="path")
        parent = meta
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, dict) and isinstance(parent.get(key), dict) else None
            if parent is None:
                break
        if parent is None:
            continue
        if data.draw(st.booleans(), label="delete"):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = data.draw(json_values, label="value")
    attempt(template, config=json.dumps(meta).encode())


@FUZZ
@given(data=st.data())
def test_fuzz_config_fields(template, data):
    """Every config field, one or two at a time, set to an arbitrary JSON value."""
    meta = json.loads((template / CONFIG_NAME).read_text())
    for key in data.draw(st.lists(st.sampled_from(sorted(meta["config"])), min_size=1, max_size=2), label="fields"):
        meta["config"][key] = data.draw(json_values, label=key)
    attempt(template, config=json.dumps(meta).encode())


@FUZZ
@given(text=st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_config_text(template, text):
    attempt(template, config=text)


@FUZZ
@given(data=st.data())
def test_fuzz_weights_bytes(template, data):
    raw = bytearray((template / WEIGHTS_NAME).read_bytes())
    op = data.draw(st.sampled_from(["truncate", "flip", "header", "random"]), label="op")
    if op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)), label="cut")]
    elif op == "flip":
        for _ in range(data.draw(st.integers(1, 8), label="n")):
            i = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[i] = data.draw(st.integers(0, 255), label="byte")
    elif op == "header":  # damage the 8-byte header length or the JSON header itself
        i = data.draw(st.integers(0, min(len(raw) - 1, 120)), label="at")
        raw[i] = data.draw(st.integers(0, 255), label="byte")
    else:
        raw = bytearray(data.draw(st.binary(max_size=400), label="bytes"))
    attempt(template, weights=bytes(raw), fix_checksum=data.draw(st.booleans(), label="fix_checksum"))


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]
KEYS = ["0.lora_A", "0.lora_B", "0.mixer", "2.lora_A", "2.lora_B", "2.mixer", "2.lora_C", "x", "0.lora_A.extra"]


@FUZZ
@given(tensors=st.dictionaries(
    st.sampled_from(KEYS) | st.text(min_size=1, max_size=10),
    st.tuples(st.lists(st.integers(0, 17), max_size=3), st.sampled_from(DTYPES)),
    max_size=7,
))
def test_fuzz_safetensors_content(template, tensors):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_file({k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in tensors.items()}, str(path))
        attempt(template, weights=path.read_bytes())
