"""Build-once cache of the tiny models (``$MM_SUBSPACE_CACHE`` or ``~/.cache/mm_subspace``) and the seeded RNG.

A build goes to a temporary sibling folder that is renamed into place, so a killed build never leaves
a half folder and two processes may build at once (the loser of the rename uses the winner's folder).
Bump a model's ``-vN`` name suffix whenever its config changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


SEED = 0


def cache_dir() -> Path:
    """Folder holding built artefacts: ``$MM_SUBSPACE_CACHE`` or ``~/.cache/mm_subspace``."""
    env = os.environ.get("MM_SUBSPACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mm_subspace"


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir() / name``, calling ``build(tmp_folder)`` first if it is missing.

    The build writes into a fresh temporary sibling folder that is then renamed into place
    (atomic on one file system). If another process won the rename, its folder is used.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=final.parent))
    try:
        logger.info("building %s in %s", name, tmp)
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("%s was built concurrently by another process; using it", name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside ``fork_rng`` so the caller's RNG state is unchanged."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
