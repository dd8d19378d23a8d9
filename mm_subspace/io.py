"""Save and load adapters: ``adapter_model.safetensors`` + ``adapter_config.json``.

Layout of a saved adapter folder::

    adapter_config.json        {"format": "mm_subspace.adapter", "format_version": 1, "config": {...},
                                "modules": {name: {"kind", "in", "out"}}, "dtype", "weights_sha256", ...}
    adapter_model.safetensors  "<module name>.<tensor>" -> tensor, e.g. "layers.0.self_attn.q_proj.lora_A"

Writes are atomic: both files are fully written to temporary names first and then renamed into
place (weights first, config last), so an interrupted save leaves the previous adapter loadable. The
config records the SHA-256 of the weights file; a mismatch (hand-mixed files) is an error, never a
silent load. Loading validates everything — JSON, format version, method, module names and shapes,
tensor keys, shapes and dtypes — and rolls back on any failure, so the model is left untouched.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_paths, file_errors, leftovers, read_text_file, register_repair, require_regular_file, sha256_file
from .bases import find_base
from .config import AdapterConfig
from .errors import AdapterFileError, ConfigError, IncompatibleAdapterError, SubspaceError
from .hub import ADAPTER_FILES, resolve
from .inject import adapter_state_dict, check_adapter_name, get_state, inject, iter_adapters, rollback, set_adapter, trainable_module_state
from .targets import base_of, candidate_modules

logger = logging.getLogger(__name__)

FORMAT = "mm_subspace.adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save of contiguous CPU copies (shared storage and views are not allowed there)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)



def _repair_pair(folder: Path) -> None:
    """If ``adapter_config.json`` names weights that only a leftover still holds, put them back in place."""
    weights = folder / WEIGHTS_NAME
    try:
        expected = json.loads(read_text_file(folder / CONFIG_NAME)).get("weights_sha256")
    except (OSError, ValueError, RecursionError, AttributeError):  # AdapterFileError is a ValueError
        return
    if not isinstance(expected, str) or (weights.is_file() and sha256_file(weights) == expected):
        return
    for path in leftovers(folder, [WEIGHTS_NAME]):
        if sha256_file(path) == expected:
            os.replace(path, weights)
            logger.warning("%s: restored the weights of the last complete save from %s", folder, path.name)
            return



register_repair((WEIGHTS_NAME, CONFIG_NAME), _repair_pair)


# -- fingerprint --------------------------------------------------------------------------------------
def base_fingerprint(model: nn.Module) -> str:
    """Short hash of the base model's parameter names and shapes (adapters excluded)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if ".adapters." in name:
            continue
        digest.update(f"{name.replace('.base_layer', '')}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:16]


def module_signature(model: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    modules = candidate_modules(model)
    out = {}
    for name in names:
        base = base_of(modules[name])
        kind = find_base(base)
        out[name] = {"kind": kind.name, "in": kind.in_features(base), "out": kind.out_features(base)}
    return out


# -- save ---------------------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    _writer: Callable[[dict[str, torch.Tensor], Path], None] = save_tensors,
) -> Path:
    """Save adapter ``adapter_name`` of ``model`` to ``save_directory`` (created if needed), atomically."""
    from ._version import __version__

    state = get_state(model)
    if adapter_name not in state.configs:
        raise AdapterFileError(f"no adapter named {adapter_name!r} to save; this model has {list(state.configs)}")
    config = state.configs[adapter_name]
    tensors = adapter_state_dict(model, adapter_name)
    modules = sorted({name for name, _ in iter_adapters(model, adapter_name)})
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()})
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    weights, cfg = out / WEIGHTS_NAME, out / CONFIG_NAME
    with atomic_paths(weights, cfg) as (tmp_weights, tmp_cfg):
        _writer(tensors, tmp_weights)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library": "mm_subspace",
            "library_version": __version__,
            "adapter_name": adapter_name,
            "config": config.to_dict(),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "base_model": {
                "class": type(model).__name__,
                "name_or_path": base_model_name_or_path or _name_or_path(model),
                "fingerprint": base_fingerprint(model),
            },
            "modules": module_signature(model, modules),
            "weights_sha256": sha256_file(tmp_weights),
        }
        tmp_cfg.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out


def _name_or_path(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "_name_or_path", None) if cfg is not None else None
    if value is None and isinstance(cfg, dict):
        value = cfg.get("_name_or_path")
    return str(value) if value else None  # diffusers keeps a Path here when loaded from one


# -- read ---------------------------------------------------------------------------------------------
@file_errors
def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``adapter_config.json`` of a saved adapter (without reading the weights)."""
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME if folder.is_dir() or not folder.suffix else folder
    require_regular_file(cfg_path, f"no {CONFIG_NAME} in {folder}: is this an adapter folder saved by mm_subspace.save_adapter?")
    try:
        meta = json.loads(read_text_file(cfg_path))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: bad JSON, or an int too long to parse
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({type(err).__name__}: {str(err)[:200]}); the file is corrupt — "
                               "re-save the adapter") from None
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        hint = " It looks like a PEFT adapter: use mm_subspace.import_peft(model, path)." if "peft_type" in meta else ""
        raise AdapterFileError(f"{cfg_path} is not an mm_subspace adapter (format={meta.get('format')!r}).{hint}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise AdapterFileError(f"{cfg_path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{cfg_path} has format_version {version}, newer than this mm_subspace reads ({FORMAT_VERSION}); "
            "upgrade mm_subspace (pip install -U mm-subspace)"
        )
    for key, typ in (("config", dict), ("modules", dict), ("weights_sha256", str)):
        if not isinstance(meta.get(key), typ):
            raise AdapterFileError(f"{cfg_path}: field {key!r} is missing or not a {typ.__name__}")
    dtype = meta.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) or (isinstance(dtype, list) and all(isinstance(d, str) for d in dtype))):
        raise AdapterFileError(f"{cfg_path}: field 'dtype' must be a dtype name or a list of them, got {dtype!r:.80}")
    for name, sig in meta["modules"].items():
        if (not isinstance(sig, dict) or not all(isinstance(sig.get(k), int) and not isinstance(sig.get(k), bool) and sig[k] > 0
                                                 for k in ("in", "out")) or not isinstance(sig.get("kind", ""), str)):
            raise AdapterFileError(f"{cfg_path}: modules[{name!r}] must be {{'kind', 'in', 'out'}}, got {sig!r}")
    try:
        meta["config_obj"] = AdapterConfig.from_dict(meta["config"])
    except Exception as err:  # SubspaceError, or a wrong value type in a hand-edited file
        detail = err if isinstance(err, SubspaceError) else f"a config value has the wrong type ({type(err).__name__}: {err})"
        raise AdapterFileError(f"{cfg_path}: {detail}") from None
    return meta


def read_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file; any corruption becomes :class:`AdapterFileError`."""
    from safetensors.torch import load_file

    require_regular_file(path, f"missing weights file {path}")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise AdapterFileError(
            f"{path} does not match the checksum in {CONFIG_NAME}: the weights are truncated, corrupt, or "
            "from a different save than the config. Re-save the adapter (or restore both files together)."
        )
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for bad headers/truncation
        raise AdapterFileError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def adapter_weights_path(folder: Path, expected_sha256: str) -> Path:
    """The weights file of the last complete save in ``folder``.

    Normally ``adapter_model.safetensors``. A save killed between its two renames leaves the new
    weights there but the previous config (the config's rename is the commit point); the previous
    weights then survive under a backup name, and this returns that file (with a warning) so the
    last complete pair loads. The next save into the folder puts it back in place.
    """
    weights = folder / WEIGHTS_NAME
    if weights.is_file() and sha256_file(weights) == expected_sha256:
        return weights
    for path in leftovers(folder, [WEIGHTS_NAME]):
        if sha256_file(path) == expected_sha256:
            logger.warning(
                "%s: %s is from an interrupted save; loading the last complete save (weights in %s). "
                "Saving into this folder again repairs it.", folder, WEIGHTS_NAME, path.name)
            return path
    return weights  # read_tensors reports the mismatch


def read_adapter_weights(folder: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors of the last complete save in ``folder`` whose ``adapter_config.json`` is ``meta``."""
    folder = Path(folder)
    return read_tensors(adapter_weights_path(folder, meta["weights_sha256"]), meta["weights_sha256"])


def check_compatible(model: nn.Module, modules: dict[str, dict[str, Any]], where: str = "adapter") -> None:
    """Raise :class:`IncompatibleAdapterError` unless every module exists in ``model`` with the same shape."""
    present = candidate_modules(model)
    missing = [n for n in modules if n not in present]
    problems = []
    if missing:
        problems.append(f"{len(missing)} module(s) absent from the model, e.g. {missing[:3]}")
    for name, sig in modules.items():
        if name in missing:
            continue
        base = base_of(present[name])
        kind = find_base(base)
        if kind is None:
            problems.append(f"{name!r} is a {type(base).__name__}, not a layer type we can wrap")
            continue
        shape = (kind.in_features(base), kind.out_features(base))
        if shape != (sig["in"], sig["out"]):
            problems.append(f"{name!r} is in={shape[0]}, out={shape[1]} here but in={sig['in']}, out={sig['out']} in the {where}")
    if problems:
        raise IncompatibleAdapterError(
            f"the {where} was made for a different base model ({type(model).__name__} here): "
            + "; ".join(problems[:5])
            + ". Load it onto the model it was trained on (see base_model in adapter_config.json)."
        )


def module_tree(modules: dict[str, dict[str, Any]], make: Callable[[dict[str, Any]], nn.Module]) -> nn.Module:
    """A tree of empty ``nn.Module`` parents with ``make(signature)`` at every recorded module name."""
    root = nn.Module()
    for name, sig in sorted(modules.items()):
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
            if type(parent) is not nn.Module:
                raise AdapterFileError(f"modules: {name!r} is nested inside another adapted module")
        if hasattr(parent, leaf):
            raise AdapterFileError(f"modules: {name!r} is both an adapted module and the parent of another")
        parent.add_module(leaf, make(sig))
    return root


def _meta_module(sig: dict[str, Any]) -> nn.Module:
    fan_in, fan_out = int(sig["in"]), int(sig["out"])
    if sig.get("kind") == "multihead_attention" and fan_out == 4 * fan_in:
        return nn.MultiheadAttention(fan_in, 1, device="meta")
    return nn.Linear(fan_in, fan_out, bias=False, device="meta")


#: elements a non-strict load may allocate beyond what the file holds (missing tensors left at init)
MISSING_ELEMENTS_BOUND = 2**24


def check_declared_shapes(config: AdapterConfig, modules: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor],
                          strict: bool, source: str) -> None:
    """Before any allocation: the adapter the config builds on the recorded module shapes (a dry run on the
    meta device) must match the file's tensors, key by key and shape by shape.

    With ``strict=False`` missing tensors are allowed up to the file's own element count (plus
    :data:`MISSING_ELEMENTS_BOUND`): a tiny file cannot make a loader allocate gigabytes.
    """
    try:
        dry = module_tree(modules, _meta_module)
        inject(dry, config.replace(targets=sorted(modules), trainable_modules=[]), adapter_name="dryrun")
    except SubspaceError:
        raise
    except (NotImplementedError, RuntimeError) as err:  # a method whose init cannot run on meta tensors
        logger.debug("dry run of %s skipped: %s", source, err)
        return
    expected = {}
    for module_name, adapter in iter_adapters(dry, "dryrun"):
        for key, value in adapter.state_dict().items():
            expected[f"{module_name}.{key}"] = tuple(value.shape)
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {shape}"
             for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != shape]
    if wrong:
        raise AdapterFileError(f"{source}: {len(wrong)} tensor(s) do not fit (the module shapes in {CONFIG_NAME}): {wrong[:5]}")
    have = sum(t.numel() for t in tensors.values())
    missing = sum(math.prod(shape) for k, shape in expected.items() if k not in tensors)
    if missing > have + MISSING_ELEMENTS_BOUND:
        raise AdapterFileError(
            f"{source}: {CONFIG_NAME} declares modules whose adapter would need {missing:,d} more elements than the "
            f"file's {have:,d}; the module shapes are wrong or the file is truncated"
        )


@file_errors
def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    strict: bool = True,
    activate: bool = True,
    allow_nonfinite: bool = False,
) -> str:
    """Load an adapter saved by :func:`save_adapter` onto ``model``; returns its adapter name.

    ``path`` is a local folder or, if no such path exists, a Hugging Face Hub id (``"user/my-moslora"``):
    only the adapter's two files are downloaded (:func:`mm_subspace.hub.resolve`).

    Args:
        adapter_name: name on this model (default: the name it was saved under).
        strict: unexpected or missing tensor keys are an error; with ``strict=False`` they are
            skipped and listed in a warning. Shape or dtype mismatches are always an error.
        activate: make the loaded adapter the active one.
        allow_nonfinite: load tensors holding NaN/inf (with a warning) instead of refusing them.

    Raises:
        AdapterFileError / IncompatibleAdapterError / ConfigError / TargetError /
        AdapterStateError: the model is left exactly as it was (tensors, requires_grad flags,
        module tree, active adapters).
    """
    folder = resolve(path, ADAPTER_FILES)
    meta = read_adapter_config(folder)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
        name = adapter_name
    else:
        name = meta.get("adapter_name") or "default"
        try:
            check_adapter_name(name)
        except ConfigError as err:
            raise AdapterFileError(f"{folder / CONFIG_NAME}: {err}; or pass adapter_name= to load it under another name") from None
    config: AdapterConfig = meta["config_obj"]
    check_compatible(model, meta["modules"])
    tensors = read_adapter_weights(folder, meta)
    saved_dtypes = meta.get("dtype")
    saved_dtypes = {saved_dtypes} if isinstance(saved_dtypes, str) else set(saved_dtypes if isinstance(saved_dtypes, list) else [])
    bad_dtype = [k for k, t in tensors.items()
                 if t.is_floating_point() and saved_dtypes and str(t.dtype).replace("torch.", "") not in saved_dtypes]
    if bad_dtype:
        raise AdapterFileError(
            f"tensor(s) {bad_dtype[:3]} in {folder / WEIGHTS_NAME} have dtype "
            f"{tensors[bad_dtype[0]].dtype}, but {CONFIG_NAME} says {sorted(saved_dtypes)}: the files do not belong together"
        )
    check_declared_shapes(config, meta["modules"], tensors, strict, str(folder / WEIGHTS_NAME))
    with rollback(model):
        try:  # inject builds every adapter before it swaps any layer
            inject(model, config.replace(targets=list(meta["modules"])), adapter_name=name)
        except Exception as err:
            if isinstance(err, SubspaceError):
                raise
            raise AdapterFileError(
                f"{folder / CONFIG_NAME}: its config cannot build the adapter ({type(err).__name__}: {err}); "
                "the file was edited by hand or is corrupt — re-save the adapter"
            ) from None
        load_tensors_into(model, name, tensors, strict=strict, source=str(folder / WEIGHTS_NAME),
                          allow_nonfinite=allow_nonfinite)
        if activate:
            set_adapter(model, name)
    return name


def load_tensors_into(
    model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], strict: bool = True, source: str = "file",
    allow_nonfinite: bool = False,
) -> None:
    """Copy ``"<module>.<tensor>"`` tensors into adapter ``adapter_name``, checking keys, shapes and dtypes.

    Tensors holding NaN/inf are refused (an adapter that outputs NaN is never what was meant) unless
    ``allow_nonfinite``, which loads them with a warning.
    """
    expected: dict[str, torch.Tensor] = {}
    for module_name, adapter in iter_adapters(model, adapter_name):
        for key, value in adapter.state_dict(keep_vars=True).items():
            expected[f"{module_name}.{key}"] = value
    expected.update(trainable_module_state(model, get_state(model).configs[adapter_name]))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if (missing or unexpected) and strict:
        raise AdapterFileError(
            f"{source} does not match adapter {adapter_name!r}: "
            + (f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); " if missing else "")
            + (f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all); "
               if unexpected else "")
            + "pass strict=False to load the rest and skip these"
        )
    if missing or unexpected:
        logger.warning("loading %s non-strictly: ignored unexpected keys %s; left missing keys at init %s", source, unexpected, missing)
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    wrong += [f"{k}: file dtype {tensors[k].dtype} is not floating point" for k in expected
              if k in tensors and expected[k].is_floating_point() and not tensors[k].is_floating_point()]
    if wrong:
        raise AdapterFileError(f"{source}: {len(wrong)} tensor(s) do not fit: {wrong[:5]}")
    nonfinite = [k for k in expected if k in tensors and tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())]
    if nonfinite and not allow_nonfinite:
        raise AdapterFileError(
            f"{source}: {len(nonfinite)} tensor(s) hold NaN or inf, e.g. {nonfinite[:5]}: the adapter would output "
            "NaN (a diverged or corrupt save). Load an earlier checkpoint, or pass allow_nonfinite=True to load it anyway"
        )
    if nonfinite:
        logger.warning("%s: loading %d tensor(s) with NaN/inf as asked (allow_nonfinite=True): %s", source, len(nonfinite), nonfinite[:5])
    with torch.no_grad():
        for key, target in expected.items():
            if key in tensors:
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
