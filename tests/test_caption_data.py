"""mm_subspace.caption_data: captions from metadata.jsonl / metadata.csv / .txt sidecars / datasets, and the
errors that keep a half-captioned data set from training silently."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from mm_subspace.caption_data import dataset_records, folder_records
from mm_subspace.compat import MissingExtraError
from mm_subspace.errors import DataError

CAPTIONED = Path(__file__).parent / "data" / "captioned"
EXPECTED = {
    "cat_sofa.png": "a photo of sks cat on a sofa",
    "cat_window.png": "a photo of sks cat by a window",
    "cat_close.png": "a close-up photo of sks cat",  # from the cat_close.txt sidecar
}


def _captions(records) -> dict[str, str | None]:
    return {Path(r.source).name: r.caption for r in records}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "captioned"
    shutil.copytree(CAPTIONED, out)
    return out


def test_committed_folder_reads_metadata_and_sidecar() -> None:
    records = folder_records(CAPTIONED)
    assert _captions(records) == EXPECTED
    assert all(r.image.mode == "RGB" and r.image.size == (40, 40) for r in records)


def test_csv_metadata_with_a_named_caption_column(folder: Path) -> None:
    (folder / "metadata.jsonl").unlink()
    (folder / "cat_close.txt").unlink()
    (folder / "metadata.csv").write_text(
        "file_name,prompt,note\ncat_sofa.png,sofa cat,x\ncat_window.png,window cat,y\ncat_close.png,close cat,z\n")
    assert _captions(folder_records(folder)) == {"cat_sofa.png": "sofa cat", "cat_window.png": "window cat",
                                                 "cat_close.png": "close cat"}  # "prompt" found by default
    assert set(_captions(folder_records(folder, caption_column="note")).values()) == {"x", "y", "z"}
    with pytest.raises(DataError, match=r"metadata.csv line 2: no caption column 'txt'.*--caption_column"):
        folder_records(folder, caption_column="txt")


def test_no_captions_means_instance_prompt(folder: Path) -> None:
    (folder / "metadata.jsonl").unlink()
    (folder / "cat_close.txt").unlink()
    assert set(_captions(folder_records(folder)).values()) == {None}


def test_a_sidecar_repeating_its_metadata_caption_is_accepted(folder: Path) -> None:
    (folder / "cat_sofa.txt").write_text(EXPECTED["cat_sofa.png"] + "\n")
    assert _captions(folder_records(folder)) == EXPECTED


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f / "metadata.jsonl").write_text(
        (f / "metadata.jsonl").read_text() + json.dumps({"file_name": "gone.png", "text": "x"}) + "\n"),
     r"metadata.jsonl line 3: file_name 'gone.png' does not exist"),
    (lambda f: (f / "metadata.jsonl").write_text(json.dumps({"file_name": "cat_sofa.png", "txt": "x"}) + "\n"),
     r"metadata.jsonl line 1: no caption column among \['text', 'caption', 'prompt'\]"),
    (lambda f: (f / "metadata.jsonl").write_text(
        json.dumps({"file_name": "cat_sofa.png", "text": "a"}) + "\n" + json.dumps({"file_name": "cat_window.png", "text": " "}) + "\n"),
     r"metadata.jsonl line 2: empty caption for 'cat_window.png'"),
    (lambda f: (f / "cat_sofa.txt").write_text("a dog"),
     r"cat_sofa.txt and .*metadata.jsonl line 1 give cat_sofa.png different captions"),
    (lambda f: (f / "notes.txt").write_text("hello"), r"caption file .*notes.txt has no image named notes"),
    (lambda f: (f / "cat_close.txt").write_text("  \n"), r"caption file .*cat_close.txt is empty"),
    (lambda f: (f / "cat_close.txt").unlink(), r"1 image\(s\) have no caption \(\['cat_close.png'\]\)"),
    (lambda f: (f / "metadata.jsonl").write_text("{not json\n"), r"metadata.jsonl line 1: not valid JSON"),
    (lambda f: (f / "metadata.csv").write_text("file_name,text\n"), r"has both metadata.jsonl and metadata.csv"),
])
def test_bad_captions_name_the_file_and_line(folder: Path, edit, message: str) -> None:
    edit(folder)
    with pytest.raises(DataError, match=message):
        folder_records(folder)


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rows = {"image": [Image.open(CAPTIONED / n).convert("RGB") for n in EXPECTED], "text": list(EXPECTED.values())}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    records = dataset_records(str(tmp_path / "ds"), caption_column="text")
    assert [r.caption for r in records] == list(EXPECTED.values()) and records[0].image.size == (40, 40)
    assert [r.caption for r in dataset_records(str(tmp_path / "ds"))] == [None] * 3  # diffusers: instance prompt
    with pytest.raises(DataError, match=r"no image column 'img' \(columns: \['image', 'text'\]\); pass --image_column"):
        dataset_records(str(tmp_path / "ds"), image_column="img")
    with pytest.raises(DataError, match="no caption column 'caption'"):
        dataset_records(str(tmp_path / "ds"), caption_column="caption")


def test_dataset_without_the_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingExtraError, match=r'--dataset_name needs the `datasets` library: pip install "mm-subspace\[train\]"'):
        dataset_records("anything")
