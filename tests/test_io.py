"""Our adapter format (mm_subspace.io): save_adapter / load_adapter round trips, and bad files.

Every loader case asserts the error's type (from :mod:`mm_subspace.errors`), that its message names
the problem, that the model is left exactly as it was (same state_dict, no AdapterLayer), and that
nothing on disk was changed by the failed load. A hypothesis fuzz (mutated config values, arbitrary
config text, damaged safetensors bytes, well-formed safetensors with arbitrary keys / shapes / dtypes;
derandomized, the same cases every run) checks that a load succeeds or raises a SubspaceError.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import mm_subspace as mms
from conftest import adapted, assert_unchanged, disk, net, rss_bytes, snapshot
from mm_subspace.errors import AdapterFileError, ConfigError, IncompatibleAdapterError, SubspaceError
from mm_subspace.io import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


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


# -- bad files: the error names the problem, the model and the folder are left as they were ----------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    mms.save_adapter(adapted(), folder)
    return folder


def assert_load_fails(folder: Path, exc: type[SubspaceError], match: str, model: nn.Module | None = None) -> None:
    """``load_adapter`` raises ``exc`` matching ``match``; model and disk are untouched."""
    model = model if model is not None else net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    files = disk(folder)
    with pytest.raises(exc, match=match) as info:
        mms.load_adapter(model, folder)
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not list(mms.adapter_layers(model)) and not mms.list_adapters(model)
    assert disk(folder) == files


def rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor] | bytes) -> None:
    """Replace the weights file and record its new checksum, so only the content is wrong."""
    weights = folder / WEIGHTS_NAME
    if isinstance(tensors, bytes):
        weights.write_bytes(tensors)
    else:
        save_file(tensors, str(weights))
    edit_config(folder, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())


def edit_config(folder: Path, **top: object) -> dict:
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta.update(top)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    return meta


def test_random_bytes_as_weights(saved):
    data = os.urandom(4096)
    (saved / WEIGHTS_NAME).write_bytes(data)
    assert_load_fails(saved, AdapterFileError, "does not match the checksum")
    rewrite_weights(saved, data)  # checksum agrees: the parser itself must refuse
    assert_load_fails(saved, AdapterFileError, "not a readable safetensors file")


def test_truncated_safetensors(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    for cut in (0, 7, 8 + 20, len(data) - 1):
        rewrite_weights(saved, data[:cut])
        assert_load_fails(saved, AdapterFileError, "not a readable safetensors file")


def test_valid_safetensors_with_wrong_shape(saved):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["2.lora_A"] = torch.zeros(4, 17)
    rewrite_weights(saved, tensors)
    assert_load_fails(saved, AdapterFileError, r"do not fit.*2\.lora_A: file \(4, 17\) vs model \(4, 16\)")


def test_valid_safetensors_with_missing_and_extra_keys(saved):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    good = dict(tensors)
    del tensors["0.mixer"]
    rewrite_weights(saved, tensors)
    assert_load_fails(saved, AdapterFileError, r"missing keys \['0\.mixer'\]")
    rewrite_weights(saved, {**good, "0.lora_C": torch.zeros(2)})
    assert_load_fails(saved, AdapterFileError, r"unexpected keys \['0\.lora_C'\]")


def test_valid_safetensors_with_wrong_dtype(saved):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    rewrite_weights(saved, {k: v.half() for k, v in tensors.items()})
    assert_load_fails(saved, AdapterFileError, r"dtype torch\.float16, but adapter_config\.json says \['float32'\]")
    rewrite_weights(saved, {**tensors, "2.lora_B": tensors["2.lora_B"].to(torch.int32)})
    assert_load_fails(saved, AdapterFileError, r"2\.lora_B: file dtype torch\.int32 is not floating point")


def test_config_not_json(saved):
    (saved / CONFIG_NAME).write_bytes(b"\xff\xfe{not json")
    assert_load_fails(saved, AdapterFileError, "is not valid JSON")
    (saved / CONFIG_NAME).write_text("[1, 2]")
    assert_load_fails(saved, AdapterFileError, "must hold a JSON object, found list")


def test_config_unknown_field(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    edit_config(saved, config={**meta["config"], "rank_dropout": 0.1})
    assert_load_fails(saved, AdapterFileError, r"unknown field\(s\) \['rank_dropout'\] for method 'moslora'")


def test_config_unknown_method(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    edit_config(saved, config={**meta["config"], "method": "moslora2"})
    assert_load_fails(saved, AdapterFileError, r"unknown adapter method 'moslora2'.*Did you mean 'moslora'")


def test_config_newer_format_version(saved):
    edit_config(saved, format_version=2)
    assert_load_fails(saved, AdapterFileError, "format_version 2, newer than this mm_subspace reads")


def test_config_not_ours(saved):
    edit_config(saved, format=None, peft_type="LORA")
    assert_load_fails(saved, AdapterFileError, "not an mm_subspace adapter.*import_peft")


def test_target_names_absent_from_model(saved):
    other = nn.Sequential(nn.Linear(12, 16))
    assert_load_fails(saved, IncompatibleAdapterError, r"absent from the model, e\.g\. \['2'\]", model=other)
    meta = json.loads((saved / CONFIG_NAME).read_text())
    edit_config(saved, modules={**meta["modules"], "decoder.q_proj": {"kind": "linear", "in": 12, "out": 16}})
    assert_load_fails(saved, IncompatibleAdapterError, r"absent from the model, e\.g\. \['decoder\.q_proj'\]")


def test_failed_load_keeps_existing_adapters(saved):
    model = adapted("lora", name="keep")
    mms.set_adapter(model, "keep")
    reference = model(X)
    meta = json.loads((saved / CONFIG_NAME).read_text())
    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["2.lora_B"] = torch.zeros(7, 4)
    rewrite_weights(saved, tensors)
    with pytest.raises(AdapterFileError, match="do not fit"):
        mms.load_adapter(model, saved)
    assert list(mms.list_adapters(model)) == ["keep"] and mms.active_adapters(model) == ["keep"]
    assert torch.equal(model(X), reference)
    assert meta["adapter_name"] == "default"


def test_reserved_name_from_a_file_says_what_to_do(tmp_path):
    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["adapter_name"] = "forward"
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    model = net()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=r"'forward' is reserved.*pass adapter_name="):
        mms.load_adapter(model, folder)
    assert_unchanged(model, before)
    with pytest.raises(ConfigError, match="'keys' is reserved"):
        mms.load_adapter(model, folder, adapter_name="keys")
    assert_unchanged(model, before)
    assert mms.load_adapter(model, folder, adapter_name="fwd") == "fwd"


# -- declared shapes are checked against the file before anything is allocated -----------------------------------
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
@pytest.mark.parametrize("strict", [True, False])
def test_tiny_folder_declaring_huge_shapes_allocates_nothing(tmp_path, strict):
    """A 2 KB folder claiming 10^9-wide modules fails before any allocation (inspect / stand-ins)."""
    from mm_subspace.formats import describe_adapter, load_standin

    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["modules"]["2"] = {"kind": "linear", "in": 10**9, "out": 10**9}
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    start = rss_bytes()
    with pytest.raises(AdapterFileError, match="do not fit"):
        load_standin(folder, strict=strict)
    with pytest.raises(AdapterFileError):
        describe_adapter(folder)
    # a module the file has no tensors for at all: the missing tensors would be gigabytes
    meta["modules"]["9"] = {"kind": "linear", "in": 10**8, "out": 10**8}
    meta["modules"]["2"] = {"kind": "linear", "in": 16, "out": 6}
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="more elements than the file"):
        load_standin(folder, strict=strict)
    assert rss_bytes() - start < 200 * 2**20


# -- non-finite numbers in files ---------------------------------------------------------------------------------
def test_nonfinite_numbers_in_files_are_refused(tmp_path):
    """alpha NaN/inf in our adapter_config.json, PEFT's lora_alpha and kohya's .alpha: refused, not NaN outputs."""
    folder = tmp_path / "ours"
    mms.save_adapter(adapted(), folder)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    for edit in ({"alpha": float("nan")}, {"alpha_pattern": {"2": float("inf")}}):
        (folder / CONFIG_NAME).write_text(json.dumps({**meta, "config": {**meta["config"], **edit}}))  # json writes NaN/Infinity
        with pytest.raises(AdapterFileError, match="finite"):
            mms.load_adapter(net(), folder)
    lora = net()
    mms.inject(lora, mms.LoraConfig(rank=2, targets=["0"], init_weights=False))
    mms.export_peft(lora, tmp_path / "peft")
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "lora_alpha": float("inf")}))
    with pytest.raises(ConfigError, match="finite"):
        mms.import_peft(net(), tmp_path / "peft")
    save_file({"lora_te1_0.lora_down.weight": torch.randn(2, 12), "lora_te1_0.lora_up.weight": torch.randn(16, 2),
               "lora_te1_0.alpha": torch.tensor(float("nan"))}, str(tmp_path / "k.safetensors"))
    model = net()
    with pytest.raises(ConfigError, match="finite"):
        mms.import_kohya(tmp_path / "k.safetensors", text_encoder=model)
    assert not mms.list_adapters(model)


def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, caplog):
    folder = tmp_path / "a"
    source = adapted()
    with torch.no_grad():
        source[2].adapters["default"].mixer.fill_(float("nan"))
    mms.save_adapter(source, folder)
    with pytest.raises(AdapterFileError, match=r"hold NaN or inf, e\.g\. \['2\.mixer'\].*allow_nonfinite=True"):
        mms.load_adapter(net(), folder)
    model = net()
    with caplog.at_level("WARNING"):
        mms.load_adapter(model, folder, allow_nonfinite=True)
    assert "NaN/inf" in caplog.text and torch.isnan(model[2].adapters["default"].mixer).all()


# -- hostile config files raise only SubspaceErrors --------------------------------------------------------------
def _hostile_configs(meta: dict) -> dict[str, str]:
    deep = "[" * 100_000 + "]" * 100_000
    return {
        "deep nesting": json.dumps({**meta, "modules": "@"}).replace('"@"', deep),
        "huge int": json.dumps({**meta, "format_version": "@"}).replace('"@"', "9" * 5000),
        "rank_pattern a list": json.dumps({**meta, "config": {**meta["config"], "rank_pattern": [1, 2]}}),
        "dtype a number": json.dumps({**meta, "dtype": 5}),
        "modules with a str kind": json.dumps({**meta, "modules": {k: {**v, "kind": []} for k, v in meta["modules"].items()}}),
        "targets a dict": json.dumps({**meta, "config": {**meta["config"], "targets": {"a": 1}}}),
    }


def test_hostile_config_files_raise_only_subspace_errors(tmp_path):
    from mm_subspace.cli import main
    from mm_subspace.formats import describe_adapter

    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    for what, text in _hostile_configs(meta).items():
        (folder / CONFIG_NAME).write_text(text)
        for call in (lambda: mms.load_adapter(net(), folder), lambda: describe_adapter(folder),
                     lambda: mms.convert_adapter(folder, tmp_path / "out", "peft")):
            try:
                call()
            except SubspaceError:
                pass
            except Exception as err:  # noqa: BLE001
                pytest.fail(f"{what}: {type(err).__name__} escaped: {str(err)[:200]}")
        assert main(["inspect", str(folder)]) == 1, what


# -- nothing is ever unpickled -----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def test_package_never_unpickles():
    """No ``torch.load`` without ``weights_only=True``, and no pickle, anywhere in shipped code."""
    offenders = []
    for folder in ("mm_subspace", "pipelines", "training", "apps"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill") and any(
                        a.name.startswith("load") or a.name == "Unpickler" for a in node.names):
                    offenders.append(f"{where}: {ast.unparse(node)} (call it qualified, with weights_only=True)")
                if not isinstance(node, ast.Call):
                    continue
                func = ast.unparse(node.func)
                if func == "torch.load" or func.endswith(".torch.load"):
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{where}: {ast.unparse(node)}")
                if func in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "cloudpickle.load"):
                    offenders.append(f"{where}: {ast.unparse(node)}")
    assert not offenders, "unpickling calls (use safetensors, or torch.load(..., weights_only=True)):\n" + "\n".join(offenders)


# -- fuzzed folders: a load succeeds or raises a SubspaceError, and a failure changes nothing --------------------
FUZZ = settings(max_examples=80, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


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


json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)


json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6
)


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
