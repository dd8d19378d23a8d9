"""Pretrained defaults shipped with the package: small safetensors folders plus a manifest.

Each shipped model is a folder ``mm_subspace/weights/<name>/`` written with ``save_pretrained``
(diffusers or transformers layout) and a ``manifest.json`` beside its files::

    {"name": ..., "format": 1,
     "files": {"unet/diffusion_pytorch_model.safetensors": {"sha256": ..., "bytes": ...}, ...},
     "command": "python training/pretrain_tiny_sdxl.py --seed 0 ...",   # exact command that made it
     "data": {...},          # data set and split
     "metrics": {...},       # measured at ship time
     "versions": {...}}      # library versions used to train

:func:`shipped_path` checks every listed file (size, then sha256) before handing out the folder,
so a truncated or altered file is an error naming the file and both hashes, never a silently
different (or random) model. The check runs once per process per folder.

:func:`write_manifest` is what the pretraining scripts in ``training/`` call last.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from .errors import ShippedModelError
from .atomic import atomic_write_text
from .atomic import sha256_file as _sha256

__all__ = ["WEIGHTS_DIR", "MANIFEST_NAME", "list_shipped", "read_manifest", "shipped_path", "write_manifest"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"
_verified: set[Path] = set()


def list_shipped() -> list[str]:
    """Names of the shipped pretrained models (folders under ``WEIGHTS_DIR`` with a manifest)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in WEIGHTS_DIR.glob(f"*/{MANIFEST_NAME}"))


def read_manifest(name_or_folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a shipped model (a name from :func:`list_shipped`, or a folder)."""
    folder = _folder(name_or_folder)
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShippedModelError(
            f"{path} is missing: the shipped model '{folder.name}' has no manifest; reinstall "
            "mm-subspace (or `git checkout -- mm_subspace/weights`)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShippedModelError(f"{path} is unreadable ({err}); reinstall mm-subspace") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ShippedModelError(f"{path} has no 'files' table; reinstall mm-subspace")
    return manifest


def _folder(name_or_folder: str | os.PathLike[str]) -> Path:
    candidate = Path(name_or_folder)
    if candidate.is_dir():
        return candidate.resolve()
    folder = WEIGHTS_DIR / str(name_or_folder)
    if not folder.is_dir():
        known = ", ".join(list_shipped()) or "none"
        raise ShippedModelError(
            f"no shipped model named '{name_or_folder}' in {WEIGHTS_DIR} (shipped: {known})"
        )
    return folder


def shipped_path(name_or_folder: str | os.PathLike[str], verify: bool = True) -> Path:
    """Folder of a shipped pretrained model, after checking every file against its manifest.

    Raises:
        ShippedModelError: the folder, its manifest or a listed file is missing, or a file's size
            or sha256 differs from the manifest (the message names the file and both hashes).
    """
    folder = _folder(name_or_folder)
    if not verify or folder in _verified:
        return folder
    manifest = read_manifest(folder)
    command = manifest.get("command", "the command in its manifest")
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ShippedModelError(
                f"shipped file {path} is missing (manifest {folder / MANIFEST_NAME}); reinstall "
                f"mm-subspace, or rebuild it with: {command}"
            )
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise ShippedModelError(
                f"shipped file {path} has {size} bytes, the manifest says {entry.get('bytes')} "
                f"(sha256 {entry.get('sha256')}): it is truncated or altered; reinstall mm-subspace, "
                f"or rebuild it with: {command}"
            )
        actual = _sha256(path)
        if actual != entry.get("sha256"):
            raise ShippedModelError(
                f"shipped file {path} has sha256 {actual}, the manifest says {entry.get('sha256')}: "
                f"it is corrupt or altered; reinstall mm-subspace, or rebuild it with: {command}"
            )
    _verified.add(folder)
    return folder


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "accelerate", "scikit-learn", "mm-subspace"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def write_manifest(
    folder: str | os.PathLike[str],
    *,
    name: str,
    command: str,
    data: dict[str, Any],
    metrics: dict[str, Any],
    **extra: Any,
) -> Path:
    """Hash every file under ``folder`` and write ``folder/manifest.json`` atomically.

    Args:
        folder: the saved model (``save_pretrained`` output).
        name: the shipped model's name (the folder name under ``mm_subspace/weights``).
        command: the exact command that produced the folder (reproducibility).
        data: the data set and its split (e.g. ``{"dataset": "sklearn digits", "test_fraction": 0.25}``).
        metrics: numbers measured at ship time (e.g. prompt accuracy and how it was measured).
        **extra: more JSON-serialisable fields (training time, sampler settings, ...).
    """
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME or rel.startswith(".") or "/." in rel:
            continue
        files[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = {
        "name": name,
        "format": 1,
        "files": files,
        "command": command,
        "data": data,
        "metrics": metrics,
        "versions": _versions(),
        **extra,
    }
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    _verified.discard(folder.resolve())
    return folder / MANIFEST_NAME
