"""mm_subspace.hub: loaders take a Hub id (local path first; only the reader's files fetched); offline is one clear error.

No test reaches a hub: ``snapshot_download`` is either run with ``HF_HUB_OFFLINE`` on (the error path) or replaced
by a function that copies a local "repository" into a cache folder (the resolution path).
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from torch import nn

import mm_subspace as mms
from mm_subspace import hub
from mm_subspace.errors import AdapterFileError, HubError


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


def _trained(method: str = "moslora") -> nn.Sequential:
    model = _net()
    mms.inject(model, mms.config_for(method, rank=2, alpha=4, targets=["0", "2"], init_weights=False))
    return model


class FakeHub:
    """``snapshot_download`` over local folders ``repos[repo_id]``: copies the files ``allow_patterns`` match."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.repos, self.calls = cache, {}, []

    def __call__(self, repo_id: str, *, allow_patterns=None, revision=None, **kwargs) -> str:
        self.calls.append((repo_id, list(allow_patterns)))
        if repo_id not in self.repos:
            raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        target = self.cache / repo_id.replace("/", "--")
        for path in sorted(self.repos[repo_id].rglob("*")):
            rel = path.relative_to(self.repos[repo_id]).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / rel)
        target.mkdir(parents=True, exist_ok=True)
        return str(target)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)  # relative ids never hit a real folder by accident
    return fake


@pytest.fixture
def offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)


def test_repo_id_shapes():
    for name in ("user/my-moslora", "gpt2", "stabilityai/stable-diffusion-xl-base-1.0", "a_b/c.d"):
        assert hub.is_repo_id(name), name
    for name in ("cat/", "./x", "/abs/x", "a/b/c", "a--b/c", "a/..b", ".hidden", "x-", "~/x", ""):
        assert not hub.is_repo_id(name), name


def test_load_adapter_from_a_hub_id_fetches_only_the_adapter_files(tmp_path, fake_hub):
    trained = _trained()
    repo = mms.save_adapter(trained, tmp_path / "repo")
    (repo / "README.md").write_text("model card")
    (repo / "big.bin").write_bytes(b"\0" * 1000)
    fake_hub.repos["user/my-moslora"] = repo
    fresh = _net()
    assert mms.load_adapter(fresh, "user/my-moslora") == "default"
    assert fake_hub.calls == [("user/my-moslora", ["adapter_config.json", "adapter_model.safetensors"])]
    fetched = tmp_path / "cache" / "user--my-moslora"
    assert sorted(p.name for p in fetched.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fresh(x), trained(x))
    assert mms.describe_adapter("user/my-moslora").method == "moslora"


def test_import_peft_and_moslora_from_hub_ids(tmp_path, fake_hub):
    lora = _trained("lora")
    fake_hub.repos["user/peft-lora"] = mms.export_peft(lora, tmp_path / "peft")
    fresh = _net()
    mms.import_peft(fresh, "user/peft-lora")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fresh(x), lora(x))
    assert fake_hub.calls[-1] == ("user/peft-lora", list(hub.PEFT_FILES))
    with pytest.raises(AdapterFileError, match="plain LoRA, not MoSLoRA"):  # reached the reader: the id resolved
        mms.import_moslora(_net(), "user/peft-lora")
    assert fake_hub.calls[-1] == ("user/peft-lora", [*hub.PEFT_FILES, "pytorch_lora_weights.safetensors"])


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(tmp_path, fake_hub):
    trained = _trained()
    mms.save_adapter(trained, tmp_path / "user" / "my-moslora")
    mms.load_adapter(_net(), "user/my-moslora")
    assert fake_hub.calls == []


def test_a_missing_path_that_is_no_repo_id_keeps_the_readers_message(fake_hub):
    with pytest.raises(AdapterFileError, match="no adapter_config.json in runs/x"):
        mms.load_adapter(_net(), "runs/x/")
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        mms.load_adapter(_net(), Path("user/my-moslora"))  # a Path is always local
    assert fake_hub.calls == []


def test_offline_hub_id_is_one_error_naming_the_id_and_the_ways_out(offline):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HubError) as info:
        mms.load_adapter(model, "user/my-moslora")
    message = str(info.value)
    for part in ("'user/my-moslora'", "HF_HUB_OFFLINE is set", "Pass a local folder", "hf auth login", "huggingface-cli login"):
        assert part in message, part
    assert isinstance(info.value, OSError) and isinstance(info.value, mms.SubspaceError)
    assert not mms.list_adapters(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(HubError, match="user/peft-lora"):
        mms.import_peft(model, "user/peft-lora")


def test_private_or_missing_repository_says_to_log_in(fake_hub, monkeypatch):
    import httpx

    def refuse(repo_id, **kwargs):
        response = httpx.Response(401, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise huggingface_hub.errors.RepositoryNotFoundError("401 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(HubError, match=r"does not exist, or it is private or gated and you are not logged in.*hf auth login"):
        mms.load_adapter(_net(), "user/private-lora")


def test_repository_without_adapter_files_is_refused(tmp_path, fake_hub):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    fake_hub.repos["user/not-an-adapter"] = tmp_path / "other"
    with pytest.raises(HubError, match=r"holds none of the adapter.s files \(adapter_config.json, adapter_model.safetensors\)"):
        mms.load_adapter(_net(), "user/not-an-adapter")


def test_single_file_ids_for_kohya_files(tmp_path, fake_hub):
    repo = tmp_path / "kohya"
    repo.mkdir()
    (repo / "a.safetensors").write_bytes(b"x")
    fake_hub.repos["user/one"] = repo
    assert hub.resolve_file("user/one/a.safetensors").read_bytes() == b"x"
    assert fake_hub.calls[-1] == ("user/one", ["a.safetensors"])
    assert hub.resolve_file("user/one").name == "a.safetensors"
    (repo / "b.safetensors").write_bytes(b"y")
    with pytest.raises(HubError, match=r"holds 2 \.safetensors files .* 'user/one/<file>'"):
        hub.resolve_file("user/one")


def test_model_flags_checked_before_loading(tmp_path, offline):
    (tmp_path / "sdxl").mkdir()
    with pytest.raises(HubError, match="the folder has no model_index.json"):
        hub.resolve_model(str(tmp_path / "sdxl"), "--pretrained_model_name_or_path", "model_index.json")
    (tmp_path / "sdxl" / "model_index.json").write_text("{}")
    assert hub.resolve_model(str(tmp_path / "sdxl"), "--pretrained_model_name_or_path", "model_index.json") == str(tmp_path / "sdxl")
    with pytest.raises(HubError, match="cat/: no such folder"):
        hub.resolve_model("cat/", "--pretrained_model_name_or_path", "model_index.json")
    with pytest.raises(HubError, match=r"--pretrained_model_name_or_path 'stabilityai/stable-diffusion-xl-base-1.0' .*HF_HUB_OFFLINE"):
        hub.resolve_model("stabilityai/stable-diffusion-xl-base-1.0", "--pretrained_model_name_or_path", "model_index.json")


def test_inspect_command_takes_a_hub_id(tmp_path, fake_hub, capsys):
    from mm_subspace.cli import main

    fake_hub.repos["user/my-moslora"] = mms.save_adapter(_trained(), tmp_path / "repo")
    assert main(["inspect", "user/my-moslora", "--json"]) == 0
    assert '"method": "moslora"' in capsys.readouterr().out
    assert fake_hub.calls[0] == ("user/my-moslora", list(hub.PIPELINE_ADAPTER_FILES))
