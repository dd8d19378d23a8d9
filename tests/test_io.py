"""save_adapter / load_adapter: bit-exact round trips and the core error paths (model left untouched)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import AdapterFileError, IncompatibleAdapterError


def _net(seed: int = 0, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.Tanh(), nn.Linear(hidden, 6))


X = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))


def _trained(method: str = "moslora", **kw) -> nn.Sequential:
    m = _net()
    mms.inject(m, mms.config_for(method, rank=4, alpha=8, targets=["0", "2"], init_weights=False, **kw))
    return m


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "moslora", "ts_mixing"])
def test_save_load_round_trip_is_bit_exact(tmp_path, method):
    m = _trained(method)
    mms.save_adapter(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["config"]["method"] == method and meta["config"]["rank"] == 4 and meta["config"]["alpha"] == 8
    assert meta["modules"] == {"0": {"kind": "linear", "in": 12, "out": 16}, "2": {"kind": "linear", "in": 16, "out": 6}}
    assert meta["dtype"] == "float32" and meta["library_version"] == mms.__version__
    fresh = _net()
    name = mms.load_adapter(fresh, tmp_path / "a")
    assert name == "default"
    for key, value in mms.adapter_state_dict(m).items():
        assert torch.equal(value, mms.adapter_state_dict(fresh)[key])
    assert torch.equal(fresh(X), m(X))


def test_second_adapter_loads_under_its_own_name(tmp_path):
    m = _trained()
    mms.save_adapter(m, tmp_path / "a")
    target = _trained("lora")
    mms.load_adapter(target, tmp_path / "a", adapter_name="mos")
    assert set(mms.list_adapters(target)) == {"default", "mos"}
    assert mms.active_adapters(target) == ["mos"]
    torch.testing.assert_close(target(X), m(X))


def _expect_untouched(m: nn.Module, before: dict, exc: type, match: str, path) -> None:
    with pytest.raises(exc, match=match):
        mms.load_adapter(m, path)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not list(mms.adapter_layers(m))


def test_truncated_or_corrupt_weights(tmp_path):
    mms.save_adapter(_trained(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    fresh = _net()
    before = _snapshot(fresh)
    weights.write_bytes(data[: len(data) // 2])
    _expect_untouched(fresh, before, AdapterFileError, "truncated, corrupt", tmp_path / "a")
    weights.write_bytes(b"\x00garbage" * 10)
    _expect_untouched(fresh, before, AdapterFileError, "truncated, corrupt", tmp_path / "a")


def test_missing_key_is_an_error_and_non_strict_loads_the_rest(tmp_path):
    m = _trained()
    mms.save_adapter(m, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["2.mixer"]
    save_file(tensors, weights)
    cfg = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    from mm_subspace.atomic import sha256_file

    meta["weights_sha256"] = sha256_file(weights)  # a consistent but incomplete save
    cfg.write_text(json.dumps(meta))
    fresh = _net()
    _expect_untouched(fresh, _snapshot(fresh), AdapterFileError, r"missing keys \['2.mixer'\].*strict=False", tmp_path / "a")
    mms.load_adapter(fresh, tmp_path / "a", strict=False)
    assert torch.equal(fresh[0].adapters["default"].lora_B, m[0].adapters["default"].lora_B)


def test_base_with_other_shapes_is_refused(tmp_path):
    mms.save_adapter(_trained(), tmp_path / "a")
    other = _net(hidden=20)
    _expect_untouched(other, _snapshot(other), IncompatibleAdapterError,
                      r"different base model.*'0' is in=12, out=20 here but in=12, out=16", tmp_path / "a")
    renamed = nn.Sequential(nn.Linear(12, 16))
    _expect_untouched(renamed, _snapshot(renamed), IncompatibleAdapterError, r"absent from the model.*\['2'\]", tmp_path / "a")


def test_config_errors(tmp_path):
    mms.save_adapter(_trained(), tmp_path / "a")
    cfg = tmp_path / "a" / "adapter_config.json"
    good = cfg.read_text()
    fresh = _net()
    before = _snapshot(fresh)
    cfg.write_text(good[:-20])
    _expect_untouched(fresh, before, AdapterFileError, "not valid JSON", tmp_path / "a")
    meta = json.loads(good)
    meta["config"]["method"] = "hyperlora"
    cfg.write_text(json.dumps(meta))
    _expect_untouched(fresh, before, AdapterFileError, "unknown adapter method 'hyperlora'", tmp_path / "a")
    meta = json.loads(good)
    meta["format_version"] = 99
    cfg.write_text(json.dumps(meta))
    _expect_untouched(fresh, before, AdapterFileError, "newer than this mm_subspace reads", tmp_path / "a")


def test_save_is_atomic_when_the_writer_fails(tmp_path):
    m = _trained()
    mms.save_adapter(m, tmp_path / "a")
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def broken_writer(tensors, path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    m2 = _trained("moslora")
    with torch.no_grad():
        m2[0].adapters["default"].lora_B.add_(1)
    with pytest.raises(OSError, match="disk full"):
        mms.save_adapter(m2, tmp_path / "a", _writer=broken_writer)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == files  # no temp files left either
    fresh = _net()
    mms.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(X), m(X))
