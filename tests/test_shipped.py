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
