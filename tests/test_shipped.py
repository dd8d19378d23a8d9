"""The shipped-model manifest: hashes written by the pretraining scripts, checked before loading."""

from __future__ import annotations

import json

import pytest

from mm_subspace import shipped
from mm_subspace.errors import ShippedModelError


def _model(tmp_path):
    folder = tmp_path / "tiny-thing"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "config.json").write_text('{"a": 1}')
    shipped.write_manifest(folder, name="tiny-thing", command="python make.py --seed 0",
                           data={"dataset": "digits"}, metrics={"acc": 0.9})
    return folder


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    folder = _model(tmp_path)
    manifest = shipped.read_manifest(folder)
    assert set(manifest["files"]) == {"unet/weights.safetensors", "config.json"}
    import hashlib

    digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    assert manifest["files"]["config.json"] == {"sha256": digest, "bytes": 8}
    assert manifest["command"] == "python make.py --seed 0" and manifest["metrics"] == {"acc": 0.9}
    assert shipped.shipped_path(folder) == folder.resolve()


def test_altered_file_names_file_and_both_hashes(tmp_path):
    folder = _model(tmp_path)
    path = folder / "unet" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = shipped.read_manifest(folder)["files"]["unet/weights.safetensors"]["sha256"]
    with pytest.raises(ShippedModelError, match="weights.safetensors") as info:
        shipped.shipped_path(folder)
    assert expected in str(info.value) and "python make.py --seed 0" in str(info.value)


def test_truncated_and_missing_files_are_errors(tmp_path):
    folder = _model(tmp_path)
    path = folder / "unet" / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ShippedModelError, match="100 bytes, the manifest says 2048"):
        shipped.shipped_path(folder)
    path.unlink()
    with pytest.raises(ShippedModelError, match="is missing"):
        shipped.shipped_path(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ShippedModelError, match="has no manifest"):
        shipped.read_manifest(folder)


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ShippedModelError, match="no shipped model named 'nope'"):
        shipped.shipped_path("nope")


def test_bad_manifest_json(tmp_path):
    folder = _model(tmp_path)
    (folder / "manifest.json").write_text(json.dumps({"files": 3}))
    with pytest.raises(ShippedModelError, match="no 'files' table"):
        shipped.read_manifest(folder)


@pytest.mark.parametrize("extra", ["special_tokens_map.json", "tokenizer/chat_template.json", ".DS_Store",
                                   "__pycache__/x.cpython-311.pyc"])
def test_files_the_manifest_does_not_list_are_refused(tmp_path, extra):
    """An added file would change what loads (a special_tokens_map.json or chat template changes the
    tokenizer and the prompts): every unlisted file is refused, hidden ones and caches included."""
    folder = _model(tmp_path)
    (folder / extra).parent.mkdir(parents=True, exist_ok=True)
    (folder / extra).write_text('{"chat_template": "{{ 1 }}"}')
    with pytest.raises(ShippedModelError, match=rf"holds 1 file\(s\) its manifest does not list \({extra}\).*"
                                                r"delete them, reinstall mm-subspace, or rebuild it with: python make.py"):
        shipped.shipped_path(folder)
    (folder / extra).unlink()
    assert shipped.shipped_path(folder) == folder.resolve()


def test_symlink_the_manifest_does_not_list_is_refused(tmp_path):
    folder = _model(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ShippedModelError, match=r"does not list \(linked\)"):
        shipped.shipped_path(folder)


def test_write_manifest_lists_hidden_files_so_the_check_passes(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / ".hidden").write_bytes(b"x")
    (folder / "w.bin").write_bytes(b"yz")
    shipped.write_manifest(folder, name="m", command="c", data={}, metrics={})
    assert set(shipped.read_manifest(folder)["files"]) == {".hidden", "w.bin"}
    assert shipped.shipped_path(folder) == folder.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShippedModelError, match="holds no file to ship"):
        shipped.write_manifest(empty, name="e", command="c", data={}, metrics={})


GOOD = {"sha256": "0" * 64, "bytes": 8}


@pytest.mark.parametrize("files, message", [
    ({}, r"empty 'files' table, so it checks nothing"),
    ({"config.json": ["0" * 64, 8]}, r"the entry of 'config.json' is not \{'sha256'"),
    ({"config.json": {"bytes": 8}}, r"the entry of 'config.json' is not"),
    ({"config.json": {"sha256": "0" * 64}}, r"the entry of 'config.json' is not"),
    ({"config.json": {"sha256": "0" * 64, "bytes": "8"}}, r"the entry of 'config.json' is not"),
    ({"config.json": {"sha256": "0" * 64, "bytes": True}}, r"the entry of 'config.json' is not"),
    ({"config.json": {"sha256": "0" * 64, "bytes": -1}}, r"the entry of 'config.json' is not"),
    ({"config.json": {"sha256": "xyz", "bytes": 8}}, r"the entry of 'config.json' is not"),
    ({"config.json": {"sha256": {"a": 1}, "bytes": 8}}, r"the entry of 'config.json' is not"),
    ({"../outside.json": GOOD}, r"lists '../outside.json', not a plain path inside its folder"),
    ({"/etc/passwd": GOOD}, r"lists '/etc/passwd', not a plain path"),
    ({"": GOOD}, r"lists '', not a plain path"),
    ({"manifest.json": GOOD}, r"lists 'manifest.json', not a plain path"),
    ({"config.json": GOOD, "unet/weights.safetensors": GOOD, "x\0": GOOD}, r"lists 'x\\x00', not a plain path"),
], ids=["empty", "list-entry", "no-sha", "no-bytes", "str-bytes", "bool-bytes", "negative-bytes", "short-sha",
        "dict-sha", "dotdot", "absolute", "blank", "itself", "nul-byte"])
def test_malformed_manifest_entries_are_shipped_model_errors(tmp_path, files, message):
    folder = _model(tmp_path)
    manifest = shipped.read_manifest(folder)
    manifest["files"] = files
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShippedModelError, match=message + ".*reinstall mm-subspace"):
        shipped.shipped_path(folder)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"files": ' * 100_000, '{"files": {"a": {"bytes": 1' + "0" * 5000 + "}}}",
                                  "\ufeff{}".encode("utf-16").decode("latin-1")],
                         ids=["deep-list", "deep-object", "huge-int", "not-utf8"])
def test_unparsable_manifest_is_a_shipped_model_error(tmp_path, text):
    folder = _model(tmp_path)
    (folder / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(ShippedModelError, match=r"manifest.json is unreadable .*reinstall mm-subspace"):
        shipped.shipped_path(folder)


def test_the_shipped_models_list_exactly_their_files():
    """The folders under mm_subspace/weights pass the strict check (no unlisted file was committed)."""
    assert shipped.list_shipped() == ["demo-adapters", "tiny-llava-digits", "tiny-sdxl-digits"]
    for name in shipped.list_shipped():
        folder = shipped.WEIGHTS_DIR / name
        shipped._verified.discard(folder)
        assert shipped.shipped_path(name) == folder
        listed = set(shipped.read_manifest(name)["files"])
        assert shipped._unlisted(folder, listed) == []
