"""Image + caption training records from a folder or a ``datasets`` dataset (DreamBooth, fine-tuning).

Every source yields the same thing, a list of :class:`ImageRecord` ``(image, caption, source)``, so a
training script does not care where the data came from (and a default data set is one more source).

Folder sources follow the conventions users bring from diffusers / ``datasets``' *imagefolder*:

* ``metadata.jsonl`` (one JSON object per line) or ``metadata.csv`` (header row) with a
  ``file_name`` column (path relative to the folder) and a caption column (``--caption_column``;
  by default the first of ``text``, ``caption``, ``prompt`` that the file has);
* ``<image stem>.txt`` sidecar files next to the images (kohya's convention), one caption each.

Precedence and checks (nothing is trained on half a data set silently): when any caption is given,
every image must have one; a metadata row naming a missing file, a missing caption column, an empty
caption, a duplicate row, a sidecar without its image, or a sidecar that disagrees with the
metadata row of the same image is a :class:`~mm_subspace.errors.DataError` naming the file and line.
A sidecar that repeats its metadata caption exactly is accepted.

Hostile folders (:mod:`mm_subspace.data.files`): a ``file_name`` with ``..`` or an absolute path, and
any image, sidecar or metadata file that is a symlink resolving outside the folder, is a ``DataError``
unless ``allow_outside=True``. Text files are UTF-8 (a BOM is dropped); invalid UTF-8, NUL bytes, too
deeply nested JSON and CSV fields over 128 KB are ``DataError`` s naming the file and line. Images are
8-bit RGB (16-bit / float images scaled by their real range); an unreadable top-level image
(decompression bomb, truncated, not an image) is skipped with a warning naming it, but one a caption
names is a ``DataError``.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data.files import load_image, parse_json, read_text, resolve_inside, to_rgb
from .errors import DataError

if TYPE_CHECKING:
    import PIL.Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "prompt")
FILE_COLUMN = "file_name"


@dataclass
class ImageRecord:
    """One training example: an RGB image, its caption (``None`` = use the instance prompt), where it came from."""

    image: PIL.Image.Image
    caption: str | None
    source: str


def list_images(folder: Path, what: str, flag: str, skip: set[str] = frozenset(),
                allow_outside: bool = False) -> list[tuple[Path, Any]]:
    """Open every image in ``folder`` (not recursive) with :func:`~mm_subspace.data.files.load_image`;
    unreadable or non-image files (decompression bombs, truncated files, ...) are skipped with a warning
    naming them; names in ``skip`` (caption files) are passed over silently.

    Raises:
        FileNotFoundError / ValueError: the folder is missing, empty, or holds no readable image.
        DataError: a file is a symlink resolving outside ``folder`` (unless ``allow_outside``).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} does not exist; point it at a folder of {what} photos")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in skip)
    if not files:
        raise ValueError(f"{flag} {folder} is empty; put a few {what} photos (png/jpg) in it")
    images, skipped = [], []
    for path in files:
        resolve_inside(folder, path.name, f"{flag} {folder}", allow_outside)
        try:
            images.append((path, load_image(path)))
        except DataError as err:
            skipped.append(str(err))  # names the file and the reason
    if skipped:
        logger.warning("skipped %d unreadable/non-image file(s) in %s: %s", len(skipped), folder, "; ".join(skipped))
    if not images:
        raise ValueError(f"{flag} {folder} holds no readable image (skipped: {', '.join(skipped)}); add png/jpg photos")
    return images


def _caption_column(columns: list[str], where: str, caption_column: str | None) -> str:
    if caption_column is not None:
        if caption_column not in columns:
            raise DataError(f"{where}: no caption column {caption_column!r} (columns: {columns}); "
                            "pass --caption_column with one of them")
        return caption_column
    found = [c for c in CAPTION_COLUMNS if c in columns]
    if not found:
        raise DataError(f"{where}: no caption column among {list(CAPTION_COLUMNS)} (columns: {columns}); "
                        "name it with --caption_column")
    return found[0]


def _metadata_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a metadata.jsonl / metadata.csv file (UTF-8, an optional BOM dropped).

    Raises:
        DataError: invalid UTF-8, a NUL byte, invalid or too deeply nested JSON, a CSV field over
            ``csv.field_size_limit()`` (128 KB) or other malformed CSV, naming the path and line.
    """
    text = read_text(path)
    rows = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            row = parse_json(line, path, number)
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            if reader.fieldnames is None:
                raise DataError(f"{path} is empty; it needs a header row with {FILE_COLUMN} and a caption column")
            for row in reader:
                rows.append((reader.line_num, row))
        except csv.Error as err:  # reader.line_num counts the lines read before the bad one
            raise DataError(f"{path} line {reader.line_num + 1}: not valid CSV ({err}); fields are at most "
                            f"{csv.field_size_limit()} characters") from None
    return rows


def read_metadata_captions(folder: Path, caption_column: str | None = None,
                           allow_outside: bool = False) -> dict[Path, tuple[str, str]]:
    """``{image path: (caption, "metadata.jsonl line N")}`` from the folder's metadata file ({} if none).

    ``file_name`` must resolve inside ``folder`` (no ``..``, absolute paths or symlinks out of it)
    unless ``allow_outside``.
    """
    present = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(present) > 1:
        raise DataError(f"{folder} has both {METADATA_FILES[0]} and {METADATA_FILES[1]}; keep one")
    if not present:
        return {}
    path = present[0]
    resolve_inside(folder, path.name, str(path), allow_outside)
    rows = _metadata_rows(path)
    if not rows:
        raise DataError(f"{path} has no rows; add one per image ({FILE_COLUMN} + caption) or remove it")
    column = None
    captions: dict[Path, tuple[str, str]] = {}
    for number, row in rows:
        where = f"{path} line {number}"
        if column is None:
            column = _caption_column(list(row), where, caption_column)
        name = row.get(FILE_COLUMN)
        if not name:
            raise DataError(f"{where}: no {FILE_COLUMN!r} (imagefolder convention: the image path relative to {folder})")
        if not isinstance(name, str):
            raise DataError(f"{where}: {FILE_COLUMN} is a {type(name).__name__}, expected a path string")
        image = resolve_inside(folder, name, where, allow_outside)
        if not image.is_file():
            raise DataError(f"{where}: {FILE_COLUMN} {name!r} does not exist in {folder}; fix the row or add the image")
        if column not in row:
            raise DataError(f"{where}: no caption column {column!r} in this row (columns: {list(row)})")
        caption = row[column]
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{where}: empty caption for {name!r}; write one or remove the row")
        if image in captions:
            raise DataError(f"{where}: {name!r} is listed twice (first at {captions[image][1]})")
        captions[image] = (caption.strip(), where)
    return captions


def folder_records(folder: Path, caption_column: str | None = None, what: str = "subject",
                   flag: str = "--instance_data_dir", allow_outside: bool = False) -> list[ImageRecord]:
    """Every image of ``folder`` with its caption (metadata file, ``.txt`` sidecars, or ``None`` for all).

    See the module docstring for the precedence rules and the errors. ``allow_outside=True`` accepts
    metadata ``file_name`` s and image symlinks that resolve outside ``folder`` (refused by default).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} does not exist; point it at a folder of {what} photos")
    sidecars = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".txt" and not p.name.startswith("."))
    skip = {*METADATA_FILES, *(p.name for p in sidecars)}
    images = dict(list_images(folder, what, flag, skip=skip, allow_outside=allow_outside))
    images = {path.resolve(): image for path, image in images.items()}
    captions = read_metadata_captions(folder, caption_column, allow_outside)

    by_stem: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(path.stem, []).append(path.resolve())
    for sidecar in sidecars:
        resolve_inside(folder, sidecar.name, f"caption file {sidecar}", allow_outside)
        targets = by_stem.get(sidecar.stem, [])
        if len(targets) != 1:
            problem = "has no image" if not targets else f"matches {len(targets)} images ({sorted(p.name for p in targets)})"
            raise DataError(f"caption file {sidecar} {problem} named {sidecar.stem}.<png|jpg|...>; "
                            "add the image, rename the caption, or remove it")
        text = read_text(sidecar).strip()
        if not text:
            raise DataError(f"caption file {sidecar} is empty; write a caption or remove it")
        image = targets[0]
        if image in captions and captions[image][0] != text:
            raise DataError(f"{sidecar} and {captions[image][1]} give {image.name} different captions "
                            f"({text!r} vs {captions[image][0]!r}); keep one")
        captions.setdefault(image, (text, str(sidecar)))

    if not captions:
        return [ImageRecord(image, None, str(path)) for path, image in sorted(images.items())]
    uncaptioned = sorted(p.name for p in images if p not in captions)
    if uncaptioned:
        raise DataError(f"{folder}: {len(uncaptioned)} image(s) have no caption ({uncaptioned[:5]}); every image needs "
                        "one once any caption is given (metadata row or .txt sidecar), or remove the captions to "
                        "train all images on --instance_prompt")
    records = []
    for path, (caption, where) in sorted(captions.items()):
        image = images.get(path)
        if image is None:  # listed in metadata but not a readable top-level image (nested, or broken)
            image = load_image(path, where)
        records.append(ImageRecord(image, caption, str(path)))
    logger.info("%d captioned images from %s", len(records), folder)
    return records


def dataset_records(name: str, image_column: str = "image", caption_column: str | None = None,
                    config_name: str | None = None, cache_dir: str | None = None, split: str = "train") -> list[ImageRecord]:
    """Records of a ``datasets`` data set: a folder saved with ``save_to_disk``, a local imagefolder /
    data folder, or a hub id (``datasets.load_dataset``). ``caption_column=None``: every image gets the
    instance prompt (diffusers' behaviour).

    Raises:
        MissingExtraError: ``datasets`` is not installed (names the extra).
        DataError: no ``split``, missing image/caption column, an empty caption or a non-image value.
    """
    from .compat import require

    datasets = require("datasets", "--dataset_name", "train")
    path = Path(name)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"dataset {name} has no {split!r} split (splits: {list(data)})")
        data = data[split]
    columns = list(data.column_names)
    if image_column not in columns:
        raise DataError(f"dataset {name}: no image column {image_column!r} (columns: {columns}); pass --image_column")
    if caption_column is not None:
        _caption_column(columns, f"dataset {name}", caption_column)
    elif any(c in columns for c in CAPTION_COLUMNS):
        logger.warning("dataset %s has a caption-like column (%s) but --caption_column is not set: every image is "
                       "trained on --instance_prompt (diffusers' behaviour); pass --caption_column to use it",
                       name, [c for c in CAPTION_COLUMNS if c in columns])
    records = []
    for i, row in enumerate(data):
        where = f"dataset {name} row {i}"
        value = row[image_column]
        if isinstance(value, str):
            value = load_image(value, where)
        if not hasattr(value, "convert"):
            raise DataError(f"{where}: column {image_column!r} holds {type(value).__name__}, not an image")
        caption = None
        if caption_column is not None:
            caption = row[caption_column]
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{where}: empty caption in column {caption_column!r}")
            caption = caption.strip()
        records.append(ImageRecord(to_rgb(value), caption, where))
    if not records:
        raise DataError(f"dataset {name} ({split}) is empty")
    return records
