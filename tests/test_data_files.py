"""mm_subspace.data.files and its two callers (caption folders, LLaVA JSON) on hostile data files:
paths out of the data folder, decompression bombs, 16-bit / float images, BOMs, invalid UTF-8, NUL
bytes, oversized CSV fields and deeply nested JSON. Every refusal is a DataError naming the file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm_subspace.caption_data import folder_records
from mm_subspace.data import llava
from mm_subspace.data.files import load_image, read_text, resolve_inside
from mm_subspace.errors import DataError

CAPTIONED = Path(__file__).parent / "data" / "captioned"
CONVERSATION = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a cat"}]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "captioned"
    shutil.copytree(CAPTIONED, out)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An image (and a text file) next to the data folder, never meant to be read through it."""
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "secret.png")
    (tmp_path / "secret.txt").write_text("a private note")
    return tmp_path / "secret.png"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(path: Path, side: int) -> Path:
    """A tiny PNG whose header declares ``side`` x ``side`` 1-bit pixels (one compressed row of data)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + side // 8), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def _expected_8bit(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return np.round((values.astype(np.float64) - low) * (255 / (high - low))).astype(np.uint8)


# --------------------------------------------------------------------------- the shared helpers
def test_resolve_inside_refuses_dotdot_absolute_and_symlinks_out(tmp_path: Path, outside: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "in.png").write_bytes(b"x")
    os.symlink(outside, data / "link.png")
    os.symlink(data / "sub" / "in.png", data / "inner_link.png")
    assert resolve_inside(data, "sub/../sub/in.png", "here") == (data / "sub" / "in.png").resolve()
    assert resolve_inside(data, "inner_link.png", "here") == (data / "sub" / "in.png").resolve()  # stays inside
    for name in ("../secret.png", str(outside), "link.png", "sub/../../secret.png"):
        with pytest.raises(DataError, match=rf"here: '{name}' resolves to .*outside the data folder.*allow_outside=True"):
            resolve_inside(data, name, "here")
        assert resolve_inside(data, name, "here", allow_outside=True) == outside.resolve()
    os.symlink("loop_b", data / "loop_a")
    os.symlink("loop_a", data / "loop_b")
    for name in ("a\0b.png", "x" * 5000, "loop_a"):  # NUL (from a JSON \u0000), too long, symlink loop
        with pytest.raises(DataError, match=r"here: .* is not a usable path"):
            resolve_inside(data, name, "here")


def test_16bit_png_and_float_tiff_are_scaled_by_their_real_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    deep = rng.integers(1000, 60000, (6, 7)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # mode I;16
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    floats = rng.random((5, 4)).astype(np.float32) * 0.01  # all in [0, 0.01]: black if cast to 8 bit
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    for name, values in (("deep.png", deep), ("float.tif", floats)):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == values.shape[::-1]
        pixels = np.asarray(image)
        assert (pixels == _expected_8bit(values)[..., None]).all()
        assert pixels.min() == 0 and pixels.max() == 255
    # a constant image has no range: it keeps its value, clipped to 0..255
    Image.fromarray(np.full((3, 3), 7, np.uint16)).save(tmp_path / "seven.png")
    Image.fromarray(np.full((3, 3), 4000, np.uint16)).save(tmp_path / "bright.png")
    Image.fromarray(np.zeros((3, 3), np.float32), mode="F").save(tmp_path / "zero.tif")
    assert np.asarray(load_image(tmp_path / "seven.png")).tolist() == [[[7] * 3] * 3] * 3
    assert (np.asarray(load_image(tmp_path / "bright.png")) == 255).all()
    assert (np.asarray(load_image(tmp_path / "zero.tif")) == 0).all()
    # NaN / inf in a float image take the finite min / max
    Image.fromarray(np.array([[np.nan, 1, 2], [3, np.inf, -np.inf]], np.float32), mode="F").save(tmp_path / "nan.tif")
    assert np.asarray(load_image(tmp_path / "nan.tif"))[..., 0].tolist() == [[0, 0, 128], [255, 255, 0]]


@pytest.mark.parametrize("side", [30000, 10000], ids=["error-level", "warning-level"])
def test_decompression_bomb_is_a_data_error_naming_the_file(tmp_path: Path, side: int) -> None:
    path = bomb_png(tmp_path / "bomb.png", side)
    assert path.stat().st_size < 1000 and side * side > Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match=r"bomb.png is refused as a decompression bomb"):
        load_image(path)


def test_truncated_and_non_images_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match=r"cut.png is not a readable image \(truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match=r"text.png is not an image PIL can read"):
        load_image(tmp_path / "text.png")


def test_read_text_drops_a_bom_and_names_the_line_of_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffa cat\n".encode())
    assert read_text(path) == "a cat\n"
    path.write_bytes(b"ok\nstill ok\nbad \xff here\n")
    with pytest.raises(DataError, match=r"a.txt line 3: not valid UTF-8"):
        read_text(path)
    path.write_bytes(b"ok\nnul \0 here\n")
    with pytest.raises(DataError, match=r"a.txt line 2: holds a NUL byte"):
        read_text(path)


# --------------------------------------------------------------------------- caption folders
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_caption_metadata_paths_out_of_the_folder_are_refused(folder: Path, outside: Path, kind: str) -> None:
    name = {"dotdot": "../secret.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    if kind == "symlink":
        os.symlink(outside, folder / "link.png")
    with (folder / "metadata.jsonl").open("a") as handle:
        handle.write(json.dumps({"file_name": name, "text": "stolen"}) + "\n")
    with pytest.raises(DataError, match=r"outside the data folder"):
        folder_records(folder)
    records = folder_records(folder, allow_outside=True)
    assert {r.caption for r in records if Path(r.source) == outside.resolve()} == {"stolen"}


def test_caption_sidecar_or_image_symlinked_out_of_the_folder_is_refused(folder: Path, outside: Path) -> None:
    (folder / "cat_close.txt").unlink()
    os.symlink(outside.with_suffix(".txt"), folder / "cat_close.txt")
    with pytest.raises(DataError, match=r"caption file .*cat_close.txt.*outside the data folder"):
        folder_records(folder)
    assert "a private note" in {r.caption for r in folder_records(folder, allow_outside=True)}
    (folder / "cat_close.txt").unlink()
    (folder / "metadata.jsonl").unlink()
    os.symlink(outside, folder / "extra.png")
    with pytest.raises(DataError, match=r"'extra.png' resolves to .*outside the data folder"):
        folder_records(folder)


def test_caption_bomb_is_skipped_with_a_warning_unless_a_caption_names_it(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    bomb_png(folder / "bomb.png", 30000)
    (folder / "cat_close.txt").unlink()
    (folder / "metadata.jsonl").unlink()
    with caplog.at_level(logging.WARNING):
        records = folder_records(folder)
    assert sorted(Path(r.source).name for r in records) == ["cat_close.png", "cat_sofa.png", "cat_window.png"]
    assert "bomb.png" in caplog.text and "decompression bomb" in caplog.text
    (folder / "metadata.csv").write_text("file_name,text\ncat_sofa.png,a\ncat_window.png,b\ncat_close.png,c\nbomb.png,d\n")
    with pytest.raises(DataError, match=r"metadata.csv line 5: .*bomb.png is refused as a decompression bomb"):
        folder_records(folder)


def test_caption_16bit_image_is_not_white(folder: Path) -> None:
    rng = np.random.default_rng(1)
    values = rng.integers(0, 4096, (16, 16)).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(values).save(folder / "cat_sofa.png")
    record = next(r for r in folder_records(folder) if r.source.endswith("cat_sofa.png"))
    assert (np.asarray(record.image)[..., 0] == _expected_8bit(values)).all()


def test_caption_files_with_a_bom_read_like_without(folder: Path) -> None:
    (folder / "cat_close.txt").write_bytes("\ufeffa close-up photo of sks cat\n".encode())
    jsonl = (folder / "metadata.jsonl").read_text()
    (folder / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl.encode())
    expected = {Path(r.source).name: r.caption for r in folder_records(CAPTIONED)}
    assert {Path(r.source).name: r.caption for r in folder_records(folder)} == expected
    (folder / "metadata.jsonl").unlink()
    (folder / "cat_close.txt").unlink()
    rows = "".join(f"{name},{caption}\n" for name, caption in expected.items())
    (folder / "metadata.csv").write_bytes("\ufefffile_name,text\n".encode() + rows.encode())
    assert {Path(r.source).name: r.caption for r in folder_records(folder)} == expected


@pytest.mark.parametrize("name, content, message", [
    ("metadata.jsonl", b'{"file_name": "cat_sofa.png", "text": "a"}\n{"file_name": "cat_window.png", "text": "\xff"}\n',
     r"metadata.jsonl line 2: not valid UTF-8"),
    ("metadata.jsonl", b'{"file_name": "cat_sofa.png", "text": "a\0"}\n', r"metadata.jsonl line 1: holds a NUL byte"),
    ("metadata.jsonl", b'{"file_name": "cat_sofa.png", "text": "a"}\n' + b"[" * 100_000 + b"\n",
     r"metadata.jsonl line 2: JSON nested too deeply"),
    ("metadata.csv", b"file_name,text\ncat_sofa.png,a\ncat_window.png,\0\n", r"metadata.csv line 3: holds a NUL byte"),
    ("metadata.csv", b"file_name,text\ncat_sofa.png," + b"x" * 200_000 + b"\n",
     r"metadata.csv line 2: not valid CSV \(field larger than field limit"),
    ("cat_close.txt", b"a close-up \xc3 photo", r"cat_close.txt line 1: not valid UTF-8"),
], ids=["jsonl-utf8", "jsonl-nul", "jsonl-deep", "csv-nul", "csv-huge-field", "sidecar-utf8"])
def test_caption_files_with_bad_bytes_name_file_and_line(folder: Path, name: str, content: bytes, message: str) -> None:
    if name != "cat_close.txt":
        (folder / "metadata.jsonl").unlink()
        (folder / "cat_close.txt").unlink()
    (folder / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        folder_records(folder)


# --------------------------------------------------------------------------- LLaVA JSON
def _llava(tmp_path: Path, records: list[dict], raw: bytes | None = None) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (5, 5, 5)).save(data / "ok.png")
    path = data / "train.json"
    path.write_bytes(raw if raw is not None else json.dumps(records).encode())
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_llava_image_paths_out_of_the_folder_are_refused(tmp_path: Path, outside: Path, kind: str) -> None:
    name = {"dotdot": "../secret.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    path = _llava(tmp_path, [{"id": "ok", "image": "ok.png", "conversations": CONVERSATION},
                             {"id": "evil", "image": name, "conversations": CONVERSATION}])
    if kind == "symlink":
        os.symlink(outside, path.parent / "link.png")
    ok, evil = llava.load_llava_json(path, path.parent)
    assert isinstance(ok, llava.Record)
    assert isinstance(evil, DataError) and "record 'evil'" in str(evil) and "outside the data folder" in str(evil)
    allowed = llava.load_llava_json(path, path.parent, allow_outside=True)[1]
    assert isinstance(allowed, llava.Record) and allowed.image.getpixel((0, 0)) == (1, 2, 3)


def test_llava_bad_images_are_the_record_error_and_deep_images_are_scaled(tmp_path: Path) -> None:
    path = _llava(tmp_path, [{"id": f"r-{n}", "image": n, "conversations": CONVERSATION}
                             for n in ("bomb.png", "cut.png", "deep.png", "f.tif", "nul\0.png")] +
                  [{"id": "r-list", "image": ["ok.png"], "conversations": CONVERSATION}])
    bomb_png(path.parent / "bomb.png", 30000)
    noise = np.random.default_rng(3).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    Image.fromarray(noise).save(path.parent / "noise.png")
    (path.parent / "cut.png").write_bytes((path.parent / "noise.png").read_bytes()[:1500])
    values = np.random.default_rng(2).integers(0, 65535, (4, 4)).astype(np.uint16)
    Image.fromarray(values).save(path.parent / "deep.png")
    Image.fromarray(np.float32(values) / 65535, mode="F").save(path.parent / "f.tif")
    bomb, cut, deep, flt, nul, as_list = llava.load_llava_json(path, path.parent)
    assert isinstance(nul, DataError) and "not a usable path" in str(nul)
    assert isinstance(bomb, DataError) and "record 'r-bomb.png'" in str(bomb) and "decompression bomb" in str(bomb)
    assert isinstance(cut, DataError) and "cut.png is not a readable image" in str(cut)
    assert isinstance(as_list, DataError) and "'image' is a list" in str(as_list)
    for record in (deep, flt):
        assert (np.asarray(record.image)[..., 0] == _expected_8bit(values)).all()


@pytest.mark.parametrize("raw, message", [
    (b"\xef\xbb\xbf" + json.dumps([{"id": "a", "conversations": CONVERSATION[1:]}]).encode(), None),
    (b'[{"id": "a",\n "conversations": "\xff"}]', r"train.json line 2: not valid UTF-8"),
    (b'{"id": "a", "conversations": []}\n{"id": "b\0"}\n', r"train.json line 2: holds a NUL byte"),
    (b"[" * 100_000, r"train.json: JSON nested too deeply"),
    (b'{"id": "a", "conversations": []}\n' + b"[" * 100_000 + b"\n", r"train.json line 2: JSON nested too deeply"),
    (b'{"id": "a", "conversations": []}\n{"id": \n', r"train.json line 2: not valid JSON"),
], ids=["bom", "utf8", "nul", "deep-list", "deep-jsonl", "jsonl-syntax"])
def test_llava_files_with_bad_bytes_name_file_and_line(tmp_path: Path, raw: bytes, message: str | None) -> None:
    path = _llava(tmp_path, [], raw)
    if message is None:  # a BOM is dropped: the record is read (and is bad only for its own reason)
        (record,) = llava.load_llava_json(path, path.parent)
        assert isinstance(record, DataError) and "turn 0 is from 'gpt'" in str(record)
        return
    with pytest.raises(DataError, match=message):
        llava.load_llava_json(path, path.parent)
