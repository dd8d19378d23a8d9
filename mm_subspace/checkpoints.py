"""Read a training checkpoint folder without running code from it, and say which checkpoint is broken.

A checkpoint folder may come from someone else, so resuming from it must not execute anything it holds:

* **Ours is JSON and safetensors.** ``trainer_state.json`` (step, method, adapter config, loss history) is
  read by :func:`read_trainer_state`, which checks its shape and types; the adapters are folders written by
  :func:`~mm_subspace.save_adapter` (safetensors, checked against their SHA-256).
* **accelerate's files** (``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``, ``scaler.pt``) are
  read only by :func:`load_torch_state`, i.e. ``torch.load(weights_only=True)``: a restricted unpickler that
  builds tensors and plain containers and refuses every other global, so it cannot run code.
* ``custom_checkpoint_*.pkl`` (accelerate's ``register_for_checkpointing``, a full unpickle) is never read;
  nothing is registered for it.

Every problem is an :class:`~mm_subspace.errors.AdapterFileError` naming the checkpoint and the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .atomic import read_text_file, require_regular_file
from .errors import AdapterFileError

TRAINER_STATE = "trainer_state.json"
#: accelerate's files that ``load_state`` reads (optimizers, LR schedulers, samplers, the fp16 scaler, per-rank RNG
#: states), all through ``torch.load(weights_only=True)``
ACCELERATE_PATTERNS = ("optimizer*.bin", "scheduler*.bin", "sampler*.bin", "dl_state_dict*.bin", "scaler.pt",
                       "random_states_*.pkl")
#: files every training checkpoint has
REQUIRED_FILES = ("optimizer.bin",)
#: keys of one loss-history row: the step (an int) and named finite floats
HISTORY_KEY = "loss_history"
#: ``trainer_state.json`` key of the fp16 loss scaler's skipped-step counts ({"total": int, "consecutive": int})
SKIPPED_KEY = "skipped_steps"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_history_rows(rows: Any, where: str) -> list[dict[str, float]]:
    """A loss history read from a file: a list of ``{"step": int >= 0, name: finite number, ...}``."""
    if not isinstance(rows, list):
        raise AdapterFileError(f"{where}: {HISTORY_KEY!r} must be a list of rows, found {type(rows).__name__}")
    for i, row in enumerate(rows):
        if (not isinstance(row, dict) or not _is_int(row.get("step")) or row["step"] < 0
                or not all(isinstance(k, str) and _is_number(v) for k, v in row.items())):
            raise AdapterFileError(f"{where}: {HISTORY_KEY}[{i}] must be {{'step': int, name: finite number, ...}}, "
                                   f"got {row!r:.120}")
    return rows


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checked ``trainer_state.json`` of ``checkpoint``: a JSON object with ``step`` (int >= 0) and ``method``
    (str); ``loss_history``, if present, as :func:`check_history_rows` wants it.

    Raises:
        AdapterFileError: naming the file — missing, not a regular file, not UTF-8, not JSON, not an object,
            or a field missing or of the wrong type.
    """
    path = Path(checkpoint) / TRAINER_STATE
    require_regular_file(path, f"checkpoint {checkpoint} has no {TRAINER_STATE}: it is not a complete checkpoint")
    try:
        state = json.loads(read_text_file(path))
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): the file is corrupt") from None
    except (ValueError, RecursionError) as err:  # bad JSON, too deep, or an integer too long to parse
        raise AdapterFileError(f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:200]}): the file is corrupt") from None
    except OSError as err:
        raise AdapterFileError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(state).__name__}: the file is corrupt")
    if not _is_int(state.get("step")) or state["step"] < 0:
        raise AdapterFileError(f"{path}: 'step' is missing or not an integer >= 0 (got {state.get('step')!r:.60})")
    if not isinstance(state.get("method"), str):
        raise AdapterFileError(f"{path}: 'method' is missing or not a string (got {state.get('method')!r:.60})")
    if HISTORY_KEY in state:
        check_history_rows(state[HISTORY_KEY], str(path))
    if SKIPPED_KEY in state:
        skipped = state[SKIPPED_KEY]
        if not (isinstance(skipped, dict) and set(skipped) == {"total", "consecutive"}
                and all(_is_int(v) and v >= 0 for v in skipped.values()) and skipped["consecutive"] <= skipped["total"]):
            raise AdapterFileError(f"{path}: {SKIPPED_KEY!r} must be {{'total': int, 'consecutive': int}} with "
                                   f"0 <= consecutive <= total (got {skipped!r:.80}): the file is corrupt")
    return state


def load_torch_state(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with accelerate's allow-list of numpy types (its RNG
    states hold numpy arrays). A truncated, corrupt or code-carrying file is an :class:`AdapterFileError`
    naming it; nothing is executed."""
    import torch

    path = Path(path)
    require_regular_file(path, f"{path} is missing")
    try:
        from accelerate.utils.other import load as accelerate_load
    except ImportError:  # accelerate's loader only adds its numpy allow-list; weights_only either way
        accelerate_load = torch.load
    try:
        return accelerate_load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        # torch's refusal goes on to explain how to unpickle anyway: keep its first sentence only
        detail = " ".join(str(err).split()).split(". ")[0][:200]
        raise AdapterFileError(
            f"{path} cannot be read as tensors ({type(err).__name__}: {detail}): it is "
            "truncated, corrupt, or holds objects other than tensors and plain data (never unpickled)"
        ) from None


def check_accelerate_files(checkpoint: str | os.PathLike, required: tuple[str, ...] = REQUIRED_FILES) -> None:
    """Read accelerate's files of ``checkpoint`` as :func:`load_torch_state` does (before any model is built), so
    a truncated ``optimizer.bin`` is reported naming it instead of failing inside ``load_state``: every file of
    :data:`ACCELERATE_PATTERNS` present, and the ``required`` ones (an optimizer's state is always saved)."""
    folder = Path(checkpoint)
    names = {p.name for pattern in ACCELERATE_PATTERNS for p in folder.glob(pattern)} | set(required)
    for name in sorted(names):
        load_torch_state(folder / name)


__all__ = ["ACCELERATE_PATTERNS", "HISTORY_KEY", "REQUIRED_FILES", "TRAINER_STATE", "check_accelerate_files",
           "check_history_rows", "load_torch_state", "read_trainer_state"]
