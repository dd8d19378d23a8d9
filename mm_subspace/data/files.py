"""Reading user data files safely: paths kept inside their folder, text, images.

Shared by the caption reader (:mod:`mm_subspace.caption_data`) and the LLaVA reader
(:mod:`mm_subspace.data.llava`), so both refuse the same hostile inputs with a :class:`DataError`
that names the file (and the line, where there is one):

* :func:`resolve_inside` — a path from a data file (``../x.png``, ``/etc/x.png``, a symlink inside the
  folder that points out of it) must resolve inside the data folder, unless the caller passes
  ``allow_outside=True``;
* :func:`read_text` — text data files are UTF-8 (a leading BOM is dropped, ``utf-8-sig``); invalid
  UTF-8 and NUL bytes are errors naming the line; :func:`parse_json` names the line of bad or too
  deeply nested JSON;
* :func:`load_image` — any image PIL opens, as 8-bit RGB: decompression bombs (more than
  ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, PIL's warning level, not only its error level), truncated and
  unidentified files are errors naming the file; 16-bit, 32-bit integer and float images are scaled to
  8 bit by their own finite min..max range (a constant image has no range: it keeps its value, clipped
  to 0..255).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["load_image", "parse_json", "read_text", "resolve_inside", "to_rgb"]

#: PIL modes whose values do not fit 8 bit; :func:`load_image` stretches them by their real range
HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def resolve_inside(folder: str | os.PathLike[str], name: str | os.PathLike[str], where: str,
                   allow_outside: bool = False) -> Path:
    """``folder / name`` with symlinks resolved, refused unless it lies inside ``folder``.

    Args:
        folder: the data folder (itself may be a symlink).
        name: a path read from a data file (relative to ``folder``; absolute paths are outside).
        where: what to name in the error (``"metadata.jsonl line 3"``, ``"record 'r1'"``).
        allow_outside: accept paths that resolve outside ``folder`` (absolute paths, ``..``, symlinks).

    Raises:
        DataError: the path resolves outside ``folder`` (the message names both and the opt-in), or
            the OS refuses it (a NUL byte, a name too long, a symlink loop).
    """
    root = Path(folder).resolve()
    try:
        path = (root / name).resolve()
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass  # the caller reports missing files in its own words
    except (OSError, ValueError, RuntimeError) as err:  # ValueError: NUL byte; RuntimeError: symlink loop
        raise DataError(f"{where}: {str(name)[:200]!r} is not a usable path ({err}); fix the name") from None
    if not allow_outside and not path.is_relative_to(root):
        raise DataError(f"{where}: {str(name)!r} resolves to {path}, outside the data folder {root}; refused "
                        "(paths in data files stay inside their folder: copy the file in, or allow paths outside "
                        "explicitly with allow_outside=True / the training scripts' --allow_outside_data)")
    return path


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text(path: str | os.PathLike[str]) -> str:
    """The text of a data file: UTF-8 with an optional BOM (``utf-8-sig``).

    Raises:
        DataError: the file cannot be read, holds a NUL byte (a binary file?) or is not valid UTF-8;
            the message names the path and the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror or err})") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} line {_line_of(data, nul)}: holds a NUL byte (a binary file, or UTF-16?); "
                        "data files must be UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} line {_line_of(data, err.start)}: not valid UTF-8 ({err.reason} at byte "
                        f"{err.start}); save the file as UTF-8") from None


def parse_json(text: str, path: str | os.PathLike[str], line: int = 0) -> Any:
    """``json.loads(text)`` of ``path`` (``line``: the JSONL line, 0 for a whole file) whose every failure
    is a :class:`DataError` naming the file and line: invalid JSON, nesting too deep for Python's parser
    (``RecursionError``), integers over Python's 4300-digit limit."""
    at = f"{path} line {line}" if line else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {line or err.lineno}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise DataError(f"{at}: JSON nested too deeply (Python's parser gives up); records are flat objects") from None
    except ValueError as err:
        raise DataError(f"{at}: not usable JSON ({err})") from None


def _to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16/32-bit integer or float single-channel image as mode ``L``, stretched by its finite min..max."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if high > low:
        values = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB copy of ``image``: modes ``I;16``/``I``/``F`` (16-bit PNG, float TIFF, ...) are scaled
    to 0..255 by the image's own finite min..max (NaN -> min, +inf -> max; a constant image keeps its
    value clipped to 0..255, so all-zero stays black); other modes go through ``convert("RGB")``."""
    if image.mode in HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], where: str | None = None) -> PIL.Image.Image:
    """Open ``path`` fully as an EXIF-rotated 8-bit RGB image.

    Images over ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's ``DecompressionBombWarning`` level) are refused
    before decoding; high-bit-depth images are scaled by their real range (:func:`to_rgb`).

    Args:
        path: the image file.
        where: what to name in the error instead of the path alone (e.g. the metadata line).

    Raises:
        DataError: the file is missing, not an image, truncated, corrupt, or a decompression bomb;
            the message names the file and the reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    name = f"{where}: {path}" if where else str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{name} is refused as a decompression bomb ({err}); shrink the image, or raise "
                        "PIL.Image.MAX_IMAGE_PIXELS if it is trusted") from None
    except UnidentifiedImageError:
        raise DataError(f"{name} is not an image PIL can read") from None
    except FileNotFoundError:
        raise DataError(f"{name} does not exist") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error) as err:
        raise DataError(f"{name} is not a readable image (truncated or corrupt: {type(err).__name__}: {err})") from None
