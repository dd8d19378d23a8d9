"""Hub ids: a local path first, else a Hugging Face Hub snapshot of only the files a reader needs.

``load_adapter(model, "user/my-moslora")``, the ``import_*`` functions and the training scripts' model flags
accept what PEFT and diffusers accept: a local folder, or a Hub repository id. :func:`resolve` returns a
local path as it is (also a missing one that does not look like a repository id, so the reader's own
"no such file" message is kept), and otherwise calls ``huggingface_hub.snapshot_download`` (imported only
then) with ``allow_patterns`` limited to the reader's files. Every failure — ``HF_HUB_OFFLINE`` set and not
cached, no network, a missing, private or gated repository, a missing revision — is one
:class:`~mm_subspace.errors.HubError` naming the id and the ways out: pass a local folder, go online / unset
``HF_HUB_OFFLINE``, or log in (``hf auth login``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import HubError

logger = logging.getLogger(__name__)

#: files of an mm_subspace adapter folder (``save_adapter``)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: files of a PEFT adapter folder (also the official MoSLoRA LLM checkpoints)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
#: an SDXL pipeline adapter: one adapter folder per component
PIPELINE_ADAPTER_FILES = ADAPTER_FILES + tuple(f"{c}/{f}" for c in ("unet", "text_encoder", "text_encoder_2") for f in ADAPTER_FILES)

#: ``name`` or ``owner/name``: word characters, ``-`` and ``.``, no ``--``/``..``, not starting or ending in ``-``/``.``
_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repository id (``name`` or ``owner/name``)."""
    return bool(_REPO_ID.fullmatch(name))


def _offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers and diffusers
        return bool(os.environ.get("HF_HUB_OFFLINE"))
    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


def failure_message(repo_id: str, what: str, err: BaseException | None) -> str:
    """The one-paragraph message of a Hub id that could not be fetched: why, and what to do."""
    kind = type(err).__name__ if err is not None else ""
    names = {cls.__name__ for cls in type(err).__mro__} if err is not None else set()
    status = getattr(getattr(err, "response", None), "status_code", None)
    if "RevisionNotFoundError" in names:
        why = "that revision does not exist in it"
    elif "RepositoryNotFoundError" in names or status in (401, 403, 404):
        why = "the repository does not exist, or it is private or gated and you are not logged in"
    elif _offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local cache"
    else:
        why = "the Hub could not be reached and it is not in the local cache"
    detail = f" [{kind}: {' '.join(str(err).split())[:200]}]" if err is not None else ""
    return (
        f"{what} {repo_id!r} is not a local path, and as a Hugging Face Hub id it could not be fetched: {why}{detail}. "
        "Pass a local folder; or, to download it: go online and unset HF_HUB_OFFLINE (once fetched it is cached), "
        "log in for a private or gated repository (`hf auth login`, or `huggingface-cli login`), and check the id"
    )


def download(repo_id: str, allow_patterns: Sequence[str], what: str = "adapter", revision: str | None = None) -> Path:
    """``snapshot_download(repo_id, allow_patterns=...)``: the local snapshot folder, or :class:`HubError`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers and diffusers
        raise HubError(f"{what} {repo_id!r} is not a local path; install huggingface_hub to fetch it from the Hub, "
                       "or pass a local folder") from None
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns), revision=revision))
    except Exception as err:  # noqa: BLE001 - huggingface_hub, httpx, OSError: all mean "could not fetch"
        raise HubError(failure_message(repo_id, what, err)) from None
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        raise HubError(f"Hub repository {repo_id!r} holds none of the {what}'s files ({', '.join(allow_patterns)}); "
                       "check the id, or pass a local folder")
    logger.info("%s %s: using the Hub snapshot in %s", what, repo_id, folder)
    return folder


def resolve(name_or_path: str | os.PathLike, allow_patterns: Sequence[str], what: str = "adapter",
            revision: str | None = None) -> Path:
    """A local path for ``name_or_path``: the path itself if it exists (or is no repository id), else the Hub
    snapshot of ``allow_patterns``.

    Only a ``str`` can be a Hub id (a ``Path`` is always local), as in PEFT and diffusers. A missing path
    that looks like an id (``runs/my-lora``) is tried on the Hub, and the error then says both.
    """
    path = Path(name_or_path).expanduser()
    if not isinstance(name_or_path, str) or os.path.lexists(path) or not is_repo_id(name_or_path):
        return path
    return download(name_or_path, allow_patterns, what, revision)


def resolve_file(name_or_path: str | os.PathLike, suffix: str = ".safetensors", what: str = "LoRA file") -> Path:
    """A single file: a local path, ``owner/name/<file>`` (that file of a Hub repository), or ``owner/name`` whose
    snapshot holds exactly one ``*<suffix>`` file."""
    path = Path(name_or_path).expanduser()
    if not isinstance(name_or_path, str) or os.path.lexists(path):
        return path
    owner, _, rest = name_or_path.partition("/")
    repo, _, filename = rest.partition("/")
    if filename and is_repo_id(f"{owner}/{repo}") and ".." not in filename.split("/"):
        return download(f"{owner}/{repo}", [filename], what) / filename
    if not is_repo_id(name_or_path):
        return path
    folder = download(name_or_path, [f"*{suffix}"], what)
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{suffix}") if p.is_file())
    if len(found) != 1:
        raise HubError(f"Hub repository {name_or_path!r} holds {len(found)} {suffix} files ({found[:8]}); name one: "
                       f"'{name_or_path}/<file>'")
    return folder / found[0]


def resolve_model(name_or_path: str, flag: str, marker: str) -> str:
    """Check a training script's base-model flag before any model loads: a local folder must hold ``marker``
    (``model_index.json`` for a diffusers pipeline, ``config.json`` for transformers); a Hub id must be
    fetchable (its ``marker`` is downloaded, or found in the cache). Returns ``name_or_path`` unchanged.

    Raises:
        HubError: one message naming the flag, the id and what to do (no traceback, no network retries).
    """
    path = Path(name_or_path).expanduser()
    if os.path.lexists(path) or not is_repo_id(name_or_path):
        if not path.is_dir():
            raise HubError(f"{flag} {name_or_path}: no such folder (and not a Hugging Face Hub id); pass the folder of "
                           "a saved model or a Hub id such as stabilityai/stable-diffusion-xl-base-1.0")
        if not (path / marker).is_file():
            raise HubError(f"{flag} {name_or_path}: the folder has no {marker}; pass the folder written by save_pretrained")
        return name_or_path
    download(name_or_path, [marker], f"{flag}")
    return name_or_path


__all__ = ["ADAPTER_FILES", "PEFT_FILES", "PIPELINE_ADAPTER_FILES", "download", "failure_message", "is_repo_id",
           "resolve", "resolve_file", "resolve_model"]
