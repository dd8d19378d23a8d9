"""Reliability hardening (issue 15): one regression test per item of the issue, plus a
kill-at-every-point test of the save protocol.

Each test is written from the issue's description of what went wrong; the helpers check the
"failed call changes nothing" contract (state dict, requires_grad flags, module tree).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import mm_subspace as mms
import mm_subspace.atomic as atomic
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
from test_reliability import newer_adapter as newer  # noqa: E402


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

            def step(label: str) -> None:
                if count[0] == point:
                    os._exit(0)
                count[0] += 1

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


# -- 3: adapters sharing trainable_modules ------------------------------------------------------------------
def head_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6), nn.LayerNorm(6))


def test_second_adapter_training_the_same_module_is_refused(tmp_path):
    """Issue 15.3: two adapters training one module in place would overwrite each other: refused, up front."""
    model = head_net()
    mms.inject(model, mms.LoraConfig(rank=2, targets=["0"], trainable_modules=["3"]), adapter_name="a")
    before = snapshot(model)
    with pytest.raises(AdapterStateError, match=r"lists trainable_modules \['3'\] that adapter 'a' already trains"):
        mms.inject(model, mms.LoraConfig(rank=2, targets=["2"], trainable_modules=["3"]), adapter_name="b")
    assert_unchanged(model, before)
    # the same through load_adapter (b saved from another model)
    other = head_net()
    mms.inject(other, mms.LoraConfig(rank=2, targets=["2"], trainable_modules=["3"]), adapter_name="b")
    mms.save_adapter(other, tmp_path / "b", adapter_name="b")
    with pytest.raises(AdapterStateError, match="already trains"):
        mms.load_adapter(model, tmp_path / "b")
    assert_unchanged(model, before)
    # disjoint trainable modules are fine; routing rows across them is refused (every row would share them)
    mms.inject(model, mms.LoraConfig(rank=2, targets=["2"]), adapter_name="c")
    with pytest.raises(AdapterStateError, match="per-row routing cannot give each row its own"):
        with mms.forward_context(model, adapter_rows=["a", "c", None]):
            pass


# -- 4: patterns read from files cannot hang the loader -----------------------------------------------------
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
    """Issue 15.4: load_adapter, import_peft and inspect with a catastrophic-backtracking rank_pattern."""
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


# -- 5: declared shapes checked against the file before allocating -----------------------------------------
from test_reliability import rss_bytes  # noqa: E402


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
@pytest.mark.parametrize("strict", [True, False])
def test_tiny_folder_declaring_huge_shapes_allocates_nothing(tmp_path, strict):
    """Issue 15.5: a 2 KB folder claiming 10^9-wide modules fails before any allocation (inspect / stand-ins)."""
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


# -- 6: adapter names, and complete rollback ---------------------------------------------------------------
from mm_subspace.inject import _RESERVED  # noqa: E402

names = st.sampled_from(sorted(_RESERVED)) | st.text(max_size=70)


@FEW
@given(name=names)
def test_inject_validates_the_name_before_touching_the_model(name):
    """Issue 15.6: a name that clashes with nn.ModuleDict (forward, keys, to, type, pop, ...) or is malformed is a
    ConfigError raised before the first layer is wrapped; a valid one works."""
    model = net()
    before = snapshot(model)
    try:
        mms.inject(model, mms.LoraConfig(rank=2, targets=["0", "2"]), adapter_name=name)
    except ConfigError as err:
        assert repr(name)[:20] in str(err) or "adapter name" in str(err)
        assert_unchanged(model, before)
    else:
        assert list(mms.list_adapters(model)) == [name] and len(list(mms.adapter_layers(model))) == 2


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


def test_failed_loads_restore_requires_grad_and_everything_else(tmp_path):
    """Issue 15.6: a load failing after injection (here: NaN tensors) leaves state dict, requires_grad flags, module
    tree and adapters identical — for load_adapter, import_peft and import_kohya, with and without other adapters."""
    source = adapted()
    mms.save_adapter(source, tmp_path / "ours")
    tensors = load_file(str(tmp_path / "ours" / WEIGHTS_NAME))
    tensors["2.lora_A"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "ours" / WEIGHTS_NAME))
    meta = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    meta["weights_sha256"] = atomic.sha256_file(tmp_path / "ours" / WEIGHTS_NAME)
    (tmp_path / "ours" / CONFIG_NAME).write_text(json.dumps(meta))
    lora = net()
    torch.manual_seed(5)
    mms.inject(lora, mms.LoraConfig(rank=2, targets=["0", "2"], init_weights=False))
    mms.export_peft(lora, tmp_path / "peft")
    peft_weights = tmp_path / "peft" / "adapter_model.safetensors"
    t = load_file(str(peft_weights))
    t[next(iter(t))].fill_(float("inf"))
    save_file(t, str(peft_weights))
    kohya = {"lora_te1_0.lora_down.weight": torch.randn(2, 12), "lora_te1_0.lora_up.weight": torch.full((16, 2), float("nan"))}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    calls = [
        lambda m: mms.load_adapter(m, tmp_path / "ours"),
        lambda m: mms.import_peft(m, tmp_path / "peft", adapter_name="p"),
        lambda m: mms.import_kohya(tmp_path / "k.safetensors", text_encoder=m, adapter_name="k"),
    ]
    for call in calls:
        for setup in ("plain", "with another adapter", "half frozen"):
            model = net()
            if setup == "with another adapter":
                mms.inject(model, mms.MoSLoRAConfig(rank=2, targets=["0"]), adapter_name="keep")
            elif setup == "half frozen":
                model[0].weight.requires_grad_(False)
            before = snapshot(model)
            with pytest.raises(AdapterFileError, match="NaN or inf"):
                call(model)
            assert_unchanged(model, before)


# -- 8: non-finite numbers -------------------------------------------------------------------------------------
nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@FEW
@given(value=nonfinite, where=st.sampled_from(["alpha", "alpha_pattern", "mpc_coef"]), method=st.sampled_from(["lora", "moslora", "dora"]))
def test_nonfinite_config_numbers_are_refused(value, where, method):
    kwargs = {"alpha_pattern": {"q": value}} if where == "alpha_pattern" else {where: value}
    if where == "mpc_coef" and method == "dora":
        kwargs = {"alpha": value}
    with pytest.raises(ConfigError, match="finite"):
        mms.config_for(method, rank=2, **kwargs)


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


# -- 9: only SubspaceErrors from loaders, importers and the CLI ----------------------------------------------
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


def test_directories_and_malformed_tensors_raise_only_subspace_errors(tmp_path):
    peft = tmp_path / "peft"
    (peft / "adapter_config.json").mkdir(parents=True)  # a directory where a file belongs
    with pytest.raises(AdapterFileError, match="cannot be read"):
        mms.import_peft(net(), peft)
    with pytest.raises(AdapterFileError):
        mms.import_moslora(net(), peft)
    save_file({"lora_te1_0.lora_down.weight": torch.randn(2, 12), "lora_te1_0.lora_up.weight": torch.randn(16)},
              str(tmp_path / "k.safetensors"))  # a 1-D up matrix
    model = net()
    with pytest.raises(SubspaceError):
        mms.import_kohya(tmp_path / "k.safetensors", text_encoder=model)
    assert not mms.list_adapters(model)


def test_cli_merge_with_broken_base_prints_one_error_line(tmp_path, capsys):
    from mm_subspace.cli import main

    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    base = tmp_path / "base"
    base.mkdir()
    for name, text in [("config.json", "{not json"), ("config.json", '{"architectures": 5}'),
                       ("config.json", '{"_class_name": "UNet2DConditionModel", "in_channels": "many"}'),
                       ("model_index.json", "[1]"), ("model_index.json", '{"_class_name": "StableDiffusionXLPipeline", "unet": 7}')]:
        for old in base.iterdir():
            old.unlink()
        (base / name).write_text(text)
        assert main(["merge", "--base", str(base), "--adapter", str(folder), str(tmp_path / f"m{len(text)}")]) == 1
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (diffusers may log its own warning line before)
        assert last.startswith("mm-subspace merge: error:") and "Traceback" not in err, (name, text, err)


# -- 10: the NaN guard names fused wrappers ------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.qkv = nn.Linear(16, 48)
        self.fc = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.qkv(self.attn(x, x, x, need_weights=False)[0]))


@pytest.mark.parametrize("where", ["attn", "qkv"])
def test_nan_guard_names_mha_and_fused_qkv_wrappers(where):
    """Issue 15.10: the first NaN module is the fused wrapper (MultiheadAttentionLayer / fused qkv), not the next leaf."""
    from mm_subspace.training_utils import locate_nonfinite

    torch.manual_seed(0)
    model = Block()
    mms.inject(model, mms.LoraConfig(rank=2, targets=["attn", "qkv"], fused_slices={"qkv": ["q", "v"]}, init_weights=False))
    with torch.no_grad():
        getattr(model, where).adapters["default"].parts["v"].lora_B[0, 0] = float("nan")
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    cls = "MultiheadAttentionLayer" if where == "attn" else "AdapterLayer"
    assert locate_nonfinite({"m": model}, lambda: model(x)) == f"m.{where} ({cls})"


# -- 11: foot-guns -----------------------------------------------------------------------------------------------
def test_export_refuses_to_overwrite_its_source(tmp_path, capsys):
    from mm_subspace.cli import main

    folder = tmp_path / "a"
    source = adapted()
    mms.save_adapter(source, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for out in (folder, folder / "peft", tmp_path):
        assert main(["export", str(folder), "--to", "peft", str(out)]) == 1
        assert "would overwrite or shadow" in capsys.readouterr().err
        assert main(["export", str(folder), "--to", "peft", str(out), "--force"]) == 1  # --force never allows it
        capsys.readouterr()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    fresh = net()
    mms.load_adapter(fresh, folder)
    assert torch.equal(fresh(X), source(X))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    assert main(["export", str(folder), "--to", "peft", str(elsewhere)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "peft", str(elsewhere), "--force"]) == 0
    with pytest.raises(ConfigError, match="would overwrite or shadow"):
        mms.convert_adapter(folder, folder, "peft")


def test_import_moslora_on_our_folder_and_inject_into_peft_model_say_what_to_do(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    folder = tmp_path / "a"
    mms.save_adapter(adapted(), folder)
    with pytest.raises(AdapterFileError, match=r"is an mm_subspace adapter folder.*mm_subspace\.load_adapter"):
        mms.import_moslora(net(), folder)
    peft_model = get_peft_model(net(), PeftLoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"wrapped by PEFT.*unload\(\).*import_peft") as info:
        mms.inject(peft_model, mms.LoraConfig(rank=2, targets=["0"]))
    assert "base_layer" not in str(info.value)
    with pytest.raises(ConfigError, match="wrapped by PEFT"):
        mms.inject(peft_model.base_model.model, mms.LoraConfig(rank=2, targets=["0"]))


# -- 12: exact merge/unmerge in half precision -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_merge_unmerge_round_trips_bit_for_bit(method, dtype):
    """Issue 15.12: merge(exact=True) keeps the base weights; 100 merge/unmerge cycles change no bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6, bias=False)).to(dtype)
    mms.inject(model, mms.config_for(method, rank=4, alpha=8, targets=["0", "2"], init_weights=False))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = X.to(dtype)
    with torch.no_grad():
        unmerged_out = model(x)
        for _ in range(100):
            mms.merge(model, exact=True)
            mms.unmerge(model)
        merged_again = None
        mms.merge(model, exact=True)
        merged_again = model(x)
        mms.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base), "exact unmerge must restore every bit"
    torch.testing.assert_close(merged_again.float(), unmerged_out.float(), atol=0.05, rtol=0.05)
    # the default (no copy kept) is documented as drifting by rounding in half precision
    assert "ulp" in (mms.merge.__doc__ or "")


def test_transformer_encoder_layer_fast_path_does_not_skip_adapters():
    """Found with 15.7: in eval + no_grad, nn.TransformerEncoderLayer(batch_first=True) runs a fused kernel on the raw
    weights of its linears (adapters silently skipped) and reads MHA attributes our wrapper lacked (crash)."""
    torch.manual_seed(0)
    for targets in (["linear1", "linear2"], ["linear1", "self_attn"]):
        model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
        mms.inject(model, mms.LoraConfig(rank=2, targets=targets, init_weights=False))
        x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
        with_grad = model(x).detach()
        with torch.no_grad():
            fast = model(x)
            with mms.disable_adapters(model):
                base = model(x)
        torch.testing.assert_close(fast, with_grad)
        assert not torch.allclose(fast, base)
