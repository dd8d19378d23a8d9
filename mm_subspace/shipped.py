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
different (or random) model. The manifest must list every file of the folder: any other file
(``manifest.json`` itself excepted; hidden files, ``.DS_Store`` and ``__pycache__`` included) is
refused, because loaders pick up extra files (a ``special_tokens_map.json`` or ``chat_template.json``
changes the tokenizer or the chat template). A manifest that is not a JSON object, has an empty or
malformed ``files`` table (a path that is absolute or climbs out with ``..``, an entry without a
64-hex ``sha256`` or an integer ``bytes``), or is nested too deeply is refused too. Every refusal is a
:class:`~mm_subspace.errors.ShippedModelError` naming the problem and the fix. The check runs once per
process per folder.

:func:`write_manifest` is what the pretraining scripts in ``training/`` call last.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import atomic_write_text
from .atomic import sha256_file as _sha256
from .errors import ShippedModelError

__all__ = ["MANIFEST_NAME", "WEIGHTS_DIR", "list_shipped", "read_manifest", "shipped_path", "write_manifest"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"
_verified: set[Path] = set()
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    except RecursionError:
        raise ShippedModelError(f"{path} is unreadable (JSON nested too deeply); reinstall mm-subspace") from None
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise ShippedModelError(f"{path} is unreadable ({err}); reinstall mm-subspace") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ShippedModelError(f"{path} has no 'files' table; reinstall mm-subspace")
    if not manifest["files"]:
        raise ShippedModelError(f"{path} has an empty 'files' table, so it checks nothing; reinstall mm-subspace")
    for rel, entry in manifest["files"].items():
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or any(c in rel for c in "\\:\0") or not parts or ".." in parts or rel == MANIFEST_NAME:
            raise ShippedModelError(f"{path} lists {rel!r}, not a plain path inside its folder; reinstall mm-subspace")
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _SHA256.fullmatch(entry["sha256"]) or type(entry.get("bytes")) is not int or entry["bytes"] < 0):
            raise ShippedModelError(f"{path}: the entry of {rel!r} is not {{'sha256': <64 hex>, 'bytes': <int>}} "
                                    f"(got {str(entry)[:200]}); reinstall mm-subspace")
    return manifest


def _unlisted(folder: Path, listed: set[str]) -> list[str]:
    """Every file, symlink or symlinked folder under ``folder`` that is neither listed nor the manifest."""
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        names = files + [d for d in dirs if (here / d).is_symlink()]  # os.walk does not enter those
        found += [(here / n).relative_to(folder).as_posix() for n in names]
    return sorted(rel for rel in found if rel != MANIFEST_NAME and rel not in listed)


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
        ShippedModelError: the folder, its manifest or a listed file is missing, a file's size
            or sha256 differs from the manifest (the message names the file and both hashes), the
            folder holds a file the manifest does not list, or the manifest is malformed or empty.
    """
    folder = _folder(name_or_folder)
    if not verify or folder in _verified:
        return folder
    manifest = read_manifest(folder)
    command = manifest.get("command")
    command = command if isinstance(command, str) else "the command in its manifest"
    extra = _unlisted(folder, set(manifest["files"]))
    if extra:
        raise ShippedModelError(
            f"shipped model folder {folder} holds {len(extra)} file(s) its manifest does not list "
            f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}): loaders would read them (tokenizer, "
            f"chat template, ...); delete them, reinstall mm-subspace, or rebuild it with: {command}"
        )
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
    """Hash every file under ``folder`` (hidden ones too: :func:`shipped_path` refuses any unlisted
    file) and write ``folder/manifest.json`` atomically.

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
        if rel != MANIFEST_NAME:
            files[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    if not files:
        raise ShippedModelError(f"{folder} holds no file to ship; save the model there first")
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
