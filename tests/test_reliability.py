"""Reliability catalogue (issue 8): bad files, interrupted saves, non-finite values, mixed dtypes,
multi-adapter routing and meta-device injection.

Every loader case asserts the error's type (from :mod:`mm_subspace.errors`), that its message names
the problem, that the model is left exactly as it was (same state_dict, no AdapterLayer), and that
nothing on disk was changed by the failed load.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mm_subspace as mms
from mm_subspace.errors import (
    AdapterFileError,
    AdapterStateError,
    IncompatibleAdapterError,
    NonFiniteError,
    SubspaceError,
)
from mm_subspace.io import CONFIG_NAME, WEIGHTS_NAME
from mm_subspace.layer import ModelState

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))


def adapted(method: str = "moslora", seed: int = 0, name: str = "default") -> nn.Sequential:
    m = net()
    torch.manual_seed(seed + 100)
    mms.inject(m, mms.config_for(method, rank=4, alpha=8, targets=["0", "2"], init_weights=False), adapter_name=name)
    return m


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    mms.save_adapter(adapted(), folder)
    return folder


def disk(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``folder`` (temp files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


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


# -- loaders ------------------------------------------------------------------------------------------
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


# -- atomic saves ---------------------------------------------------------------------------------------
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


# -- numerics -------------------------------------------------------------------------------------------
def test_nonfinite_adapter_output_is_reported_with_module_name():
    from mm_subspace.training_utils import check_finite, locate_nonfinite, nonfinite_parameters

    m = adapted()
    with torch.no_grad():
        m[2].adapters["default"].lora_B[0, 0] = float("nan")
    loss = m(X).pow(2).mean()
    assert not torch.isfinite(loss)
    where = locate_nonfinite({"unet": m}, lambda: m(X))
    assert where == "unet.2 (AdapterLayer)"
    assert nonfinite_parameters({"unet": m}) == ["unet.2.adapters.default.lora_B"]
    with pytest.raises(NonFiniteError, match=r"non-finite loss=nan at step 7; first NaN/inf appears in unet\.2 \(AdapterLayer\)"):
        check_finite({"loss": loss.item() if not loss.requires_grad else float(loss.detach())}, step=7, where=lambda: where, last_checkpoint=None)
    check_finite({"loss": 1.0}, step=1, where=lambda: "unused", last_checkpoint=None)  # finite: no error


def test_inf_in_base_input_names_the_first_module():
    from mm_subspace.training_utils import locate_nonfinite

    m = adapted()
    with torch.no_grad():
        m[0].base_layer.weight[0, 0] = float("inf")
    assert locate_nonfinite({"model": m}, lambda: m(X)) == "model.0.base_layer (Linear)"


@pytest.mark.parametrize("base_dtype,adapter_dtype", [
    (torch.float16, "float32"), (torch.bfloat16, "float32"), (torch.float32, "bfloat16"), (torch.float32, "float16"),
])
def test_mixed_dtypes_give_the_base_dtype(base_dtype, adapter_dtype):
    torch.manual_seed(0)
    base = nn.Linear(12, 16)
    m = nn.Sequential(nn.Linear(12, 16).to(base_dtype))
    m[0].load_state_dict({k: v.to(base_dtype) for k, v in base.state_dict().items()})
    mms.inject(m, mms.MoSLoRAConfig(rank=4, alpha=8, targets=["0"], init_weights=False, dtype=adapter_dtype))
    adapter = m[0].adapters["default"]
    assert adapter.lora_A.dtype == getattr(torch, adapter_dtype)
    x = X.to(base_dtype)
    out = m(x)
    assert out.dtype == base_dtype
    a, mix, b = (t.float() for t in (adapter.lora_A, adapter.mixer, adapter.lora_B))
    w, bias = (t.float() for t in (m[0].base_layer.weight, m[0].base_layer.bias))
    expected = x.float() @ w.T + bias + adapter.scaling * x.float() @ a.T @ mix.T @ b.T
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert adapter.lora_A.grad is not None and adapter.lora_A.grad.dtype == adapter.lora_A.dtype


# -- concurrency ----------------------------------------------------------------------------------------
def test_two_adapters_on_rows_of_one_batch_never_mix():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    torch.manual_seed(3)
    mms.inject(model, mms.MoSLoRAConfig(rank=4, alpha=8, targets="llama", init_weights=False), adapter_name="a")
    mms.inject(model, mms.LoraConfig(rank=4, alpha=8, targets="llama", init_weights=False), adapter_name="b")
    ids = torch.randint(0, 1000, (4, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        single = {}
        for name in ("a", "b"):
            mms.set_adapter(model, name)
            single[name] = model(ids).logits
        with mms.disable_adapters(model):
            single[None] = model(ids).logits
        rows = ["a", "b", None, "a"]
        with mms.forward_context(model, adapter_rows=rows):
            mixed = model(ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single["a"], single["b"])  # the adapters really differ


def test_reinjecting_the_same_name_is_refused():
    m = adapted()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(AdapterStateError, match="an adapter named 'default' already exists"):
        mms.inject(m, mms.LoraConfig(rank=2, targets=["0"]))
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert list(mms.list_adapters(m)) == ["default"]


def test_thread_safety_is_documented():
    doc = ModelState.__doc__ or ""
    assert "Not thread-safe" in doc and "set_adapter" in doc and "one model per thread" in doc


# -- resources -----------------------------------------------------------------------------------------
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
def test_meta_llama3_8b_injection_allocates_nothing():
    from transformers import LlamaForCausalLM

    from mm_subspace.tiny_models import llama3_8b_config

    start = rss_bytes()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama3_8b_config())
    mms.inject(model, mms.MoSLoRAConfig(rank=16, alpha=32, targets="llama_moslora"))
    not_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if not p.is_meta]
    assert not not_meta, f"left the meta device: {not_meta[:5]}"
    grown = rss_bytes() - start
    assert grown < 100 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB for a meta-device 8B model"
    assert mms.trainable_parameters(model)[0] == 28_352_512  # MoSLoRA Table 4: 28.4M
