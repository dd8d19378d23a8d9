"""Photos from scikit-image's bundled data (no download).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image

from .cache import SEED

# scikit-image photos that are bundled with the package (no download needed).
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "clock",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
)


def cat_photos(n: int = 4, size: int = 64, seed: int = SEED) -> list[PIL.Image.Image]:
    """``n`` real photos of one subject: crops/flips of scikit-image's ``chelsea`` cat (CC0).

    Deterministic for a given ``(n, size, seed)``: square crops of 220-300 px around the
    cat's face, every other one mirrored, resized to ``size`` x ``size`` RGB.
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    if n < 1 or size < 1:
        raise ValueError(f"cat_photos needs n >= 1 and size >= 1, got n={n}, size={size}")
    photo = Image.fromarray(data.chelsea())  # 451 x 300, face centred near x=215
    width, height = photo.size
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        side = int(rng.integers(220, height + 1))
        cx = 215 + int(rng.integers(-35, 36))
        left = min(max(cx - side // 2, 0), width - side)
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if i % 2 == 1:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(crop.resize((size, size), Image.Resampling.BICUBIC))
    return images


def write_cat_photos(folder: str | os.PathLike[str], n: int = 4, size: int = 64) -> list[Path]:
    """Save ``cat_photos(n, size)`` as ``folder/cat_00.png`` ... (a DreamBooth instance folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(cat_photos(n, size)):
        path = folder / f"cat_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def sample_photo(name: str = "astronaut", size: int | None = None) -> PIL.Image.Image:
    """A real RGB photo bundled with scikit-image (``SAMPLE_PHOTOS``), optionally resized.

    Args:
        name: e.g. "astronaut" (NASA, public domain), "chelsea", "coffee", "rocket".
        size: if given, resize to ``size`` x ``size`` (no crop).
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    if name not in SAMPLE_PHOTOS:
        import difflib

        close = difflib.get_close_matches(name, SAMPLE_PHOTOS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"unknown sample photo '{name}'; {hint}choose one of {', '.join(SAMPLE_PHOTOS)} "
            "(others in skimage.data need a download)"
        )
    array = np.asarray(getattr(data, name)())
    image = Image.fromarray(array).convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image
