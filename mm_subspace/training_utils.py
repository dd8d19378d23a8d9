"""Helpers shared by the training scripts in ``training/`` (DreamBooth SDXL, and the ones to come).

Everything here is model-family agnostic: it works on "parts", a ``{name: model}`` dict such as
``{"unet": unet, "text_encoder": te1, "text_encoder_2": te2}``, where each model carries an
mm_subspace adapter called ``"default"``.

* :func:`param_groups`, :func:`cast_trainable_params`: optimizer groups per part, fp32 trainables.
* :class:`CheckpointManager`: atomic ``accelerate.save_state`` checkpoints in
  ``<output_dir>/checkpoint-<step>`` (diffusers' layout), rotation, ``latest`` resolution, and
  save/load hooks that write the adapters in our own format (``<checkpoint>/<part>/``).
* :func:`step_generator`, :func:`sample_indices`: randomness that is a pure function of
  ``(seed, rank, micro step)``, so a resumed run draws exactly what the uninterrupted one drew.
* :func:`check_finite`, :func:`locate_nonfinite`: stop on a NaN/inf loss, naming the module.
* :func:`adapters_digest`, :func:`assert_replicas_in_sync`: all ranks hold the same adapters.
* :class:`LossHistory`, :func:`save_loss_curve`, :func:`image_grid`, :func:`write_model_card`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .atomic import atomic_paths, atomic_write_text, fsync_dir
from .checkpoints import HISTORY_KEY, SKIPPED_KEY, TRAINER_STATE, check_accelerate_files, check_history_rows, read_trainer_state
from .errors import AdapterFileError, ConfigError, NonFiniteError
from .inject import adapter_layers, adapter_state_dict, get_state
from .io import CONFIG_NAME, WEIGHTS_NAME, load_tensors_into, read_adapter_config, read_adapter_weights, save_adapter
from .layer import AdapterLayer

if TYPE_CHECKING:
    import PIL.Image
    from accelerate import Accelerator

    from .config import AdapterConfig

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
CHECKPOINT_PREFIX = "checkpoint-"
#: where checkpoints lived before they moved to diffusers' ``<output_dir>/checkpoint-<step>``: still found (``latest``,
#: a name, rotation), so an older run resumes
LEGACY_STATE_DIR = "training_state"


#: training-script flags that map to a field of the method's config (passed only when the method has it)
METHOD_FLAGS = ("mixer_init", "num_subspaces", "pairing", "a_init", "router_temperature", "balance_coef")


def check_method_flags(args: Any, flags: tuple[str, ...] = METHOD_FLAGS) -> None:
    """A method flag given for a method without that config field is a ConfigError naming the methods that have it."""
    from .registry import get_method, list_methods

    fields = get_method(args.adapter).config_class.field_names()
    for flag in flags:
        if getattr(args, flag) is not None and flag not in fields:
            have = [m for m in list_methods() if flag in get_method(m).config_class.field_names()]
            raise ConfigError(f"--{flag} does not apply to --adapter {args.adapter}; it is a flag of {', '.join(have) or 'no method'}")


def method_flag_values(args: Any, flags: tuple[str, ...] = METHOD_FLAGS) -> dict[str, Any]:
    """``{field: value}`` of the method flags given (not None) that ``args.adapter``'s config has."""
    from .registry import get_method

    fields = get_method(args.adapter).config_class.field_names()
    return {f: getattr(args, f) for f in flags if f in fields and getattr(args, f) is not None}


def is_dora(method: str) -> bool:
    """Whether ``method`` is DoRA (or built on it): a trained per-row magnitude, so no plain-LoRA ΔW = B·A —
    no kohya file, PEFT's DoRA layout in ``pytorch_lora_weights.safetensors``. The scripts' one check for it."""
    from .registry import get_method

    return get_method(method).config_class.has_magnitude


def check_positive(args: Any, names: list[str], allow_zero: bool = False) -> None:
    """Each flag in ``names`` that is set must be finite and > 0 (``allow_zero``: >= 0); else a ConfigError (a
    ValueError) naming it. NaN fails every comparison, so it is refused explicitly."""
    for name in names:
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"--{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")


# -- parameters --------------------------------------------------------------------------------------
def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter of ``model`` that requires grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(
    parts: dict[str, nn.Module], lr: dict[str, float], weight_decay: dict[str, float] | float = 0.0
) -> list[dict[str, Any]]:
    """One optimizer group per part with trainable parameters: ``{"name", "params", "lr", "weight_decay"}``.

    Args:
        parts: ``{part name: model}``.
        lr: learning rate per part name (``"*"`` is the fallback).
        weight_decay: per part name (``"*"`` fallback) or one value for all.

    Raises:
        ConfigError: no part has a trainable parameter (nothing would be trained).
    """
    groups = []
    for name, model in parts.items():
        params = [p for _, p in trainable_named_parameters(model)]
        if not params:
            continue
        wd = weight_decay if isinstance(weight_decay, (int, float)) else weight_decay.get(name, weight_decay.get("*", 0.0))
        groups.append({"name": name, "params": params, "lr": lr.get(name, lr.get("*")), "weight_decay": float(wd)})
    if not groups:
        raise ConfigError(f"no trainable parameters in {list(parts)}: inject an adapter (mm_subspace.inject) first")
    return groups


def cast_trainable_params(models: Iterable[nn.Module], dtype: torch.dtype = torch.float32) -> int:
    """Cast every trainable parameter to ``dtype`` in place (fp32 masters under mixed precision).

    Frozen weights may stay in half precision; the adapters still see their own dtype because
    :class:`~mm_subspace.layer.LowRankAdapter` casts its input to ``lora_A``'s dtype. Returns the
    number of parameters cast.
    """
    n = 0
    for model in models:
        for _, param in trainable_named_parameters(model):
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
                n += 1
    return n


# -- deterministic randomness ------------------------------------------------------------------------
def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (e.g. rank, micro step)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, keys)]).generate_state(2, np.uint64)[0] >> 1)


def step_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded by :func:`step_seed` — noise, timesteps and VAE samples per step.

    Drawing every random number of step ``k`` from ``step_generator(seed, rank, k)`` makes a
    resumed run bit-identical to an uninterrupted one, whatever happened to the global RNG.
    """
    return torch.Generator(device=device).manual_seed(step_seed(seed, *keys))


def sample_indices(n: int, batch: int, micro_step: int, rank: int, world: int, seed: int) -> list[int]:
    """Dataset indices of micro-batch ``micro_step`` on ``rank``: epochs of seeded permutations, sharded.

    Position ``p = (micro_step·world + rank)·batch + j`` reads ``perm(epoch = p // n)[p % n]``, so the
    ranks together walk each epoch's permutation once, and the order is a function of the step only.
    """
    return [index for _, index in sample_epoch_indices(n, batch, micro_step, rank, world, seed)]


def sample_epoch_indices(n: int, batch: int, micro_step: int, rank: int, world: int, seed: int) -> list[tuple[int, int]]:
    """:func:`sample_indices` with the epoch of each draw: ``[(epoch, index), ...]`` (per-epoch augmentation)."""
    if n <= 0:
        raise ConfigError("the training set is empty")
    out, perms = [], {}
    for j in range(batch):
        pos = (micro_step * world + rank) * batch + j
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=step_generator(seed, 0x5EED, epoch)).tolist()
        out.append((epoch, perms[epoch][pos % n]))
    return out


# -- non-finite detection ---------------------------------------------------------------------------
def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
    elif hasattr(obj, "to_tuple"):  # diffusers/transformers ModelOutput
        yield from _tensors(obj.to_tuple())


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def nonfinite_parameters(parts: dict[str, nn.Module], grads: bool = False) -> list[str]:
    """Names (``part.param``) of trainable parameters (or their gradients) holding NaN/inf."""
    bad = []
    for part, model in parts.items():
        for name, param in trainable_named_parameters(model):
            value = param.grad if grads else param
            if value is not None and not _finite(value):
                bad.append(f"{part}.{name}")
    return bad


def locate_nonfinite(parts: dict[str, nn.Module], run: Callable[[], Any]) -> str | None:
    """Re-run ``run()`` (no grad) with hooks on every module; name the first whose output is NaN/inf.

    Returns ``"<part>.<module name> (<class>)"`` or ``None`` when every output was finite.
    """
    found: list[str] = []
    handles = []

    def hook_for(label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not found and not all(_finite(t) for t in _tensors(output)):
                found.append(f"{label} ({type(module).__name__})")

        return hook

    for part, model in parts.items():
        for name, module in model.named_modules():
            is_leaf = not any(True for _ in module.children())
            inside_adapter = ".adapters." in f".{name}."  # an adapter's own parts: its AdapterLayer is named instead
            if name and not inside_adapter and (is_leaf or isinstance(module, AdapterLayer)):  # subclasses too (MHA)
                handles.append(module.register_forward_hook(hook_for(f"{part}.{name}")))
    try:
        with torch.no_grad():
            run()
    except Exception as err:  # the re-run is diagnostic only
        logger.debug("diagnostic re-run failed: %s", err)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def check_finite(values: dict[str, float], step: int, where: Callable[[], str], last_checkpoint: Path | None) -> None:
    """Raise :class:`NonFiniteError` if any of ``values`` (loss terms, grad norm) is NaN/inf.

    Args:
        values: ``{"loss": ..., "aux_loss": ..., "grad_norm": ...}`` as Python floats.
        step: optimizer step being computed (1-based), for the message.
        where: called only on failure; returns a description of the first NaN/inf module.
        last_checkpoint: the last good checkpoint, kept on disk.
    """
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    raise NonFiniteError(
        f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; first NaN/inf appears in "
        f"{where()}. Training stopped without saving the current weights. {_keep_message(last_checkpoint)}"
    )


def _keep_message(last_checkpoint: Path | None) -> str:
    if last_checkpoint is None:
        return "No checkpoint was written before it (use --checkpointing_steps to keep one)."
    return (f"The last good checkpoint {last_checkpoint} is kept: resume from it with --resume_from_checkpoint latest "
            "and a lower --learning_rate (or --max_grad_norm, or no fp16).")


# -- replicas ---------------------------------------------------------------------------------------
def adapters_digest(parts: dict[str, nn.Module]) -> str:
    """SHA-256 (16 hex digits) of every adapter tensor of every part, in a fixed order."""
    digest = hashlib.sha256()
    for part in sorted(parts):
        for key, tensor in sorted(adapter_state_dict(parts[part], ADAPTER_NAME).items()):
            digest.update(f"{part}.{key}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def assert_replicas_in_sync(accelerator: Accelerator, parts: dict[str, nn.Module]) -> str:
    """Gather :func:`adapters_digest` from every rank; raise if any rank differs. Returns the digest."""
    digest = adapters_digest(parts)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        digests = gather_object([digest])
        if len(set(digests)) != 1:
            raise RuntimeError(f"adapter weights differ across ranks: {digests}; gradients were not synchronised")
    return digest


# -- checkpoints ------------------------------------------------------------------------------------
def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def save_parts(parts: dict[str, nn.Module], folder: str | os.PathLike, base_model_name_or_path: str | None = None) -> list[Path]:
    """``save_adapter`` each part to ``folder/<part>/`` (our format; atomic per file)."""
    return [
        save_adapter(model, Path(folder) / part, ADAPTER_NAME, base_model_name_or_path=base_model_name_or_path)
        for part, model in parts.items()
    ]


def check_adapter_folder(folder: Path, method: str, parts: Sequence[str]) -> None:
    """Check that ``folder/<part>/`` holds a readable adapter of ``method`` for every part (before training)."""
    for part in parts:
        meta = read_adapter_config(folder / part)
        saved = meta["config"].get("method")
        if saved != method:
            raise ConfigError(
                f"{folder} was trained with --adapter {saved}, not {method}: resume with --adapter {saved}, "
                "or start a fresh run (another --output_dir, or no --resume_from_checkpoint)"
            )


#: config fields a resumed run may change (they do not change what was trained)
RESUME_FREE_FIELDS = ("init_weights", "dtype")
#: config field -> the flag that sets it, where the names differ
FLAG_OF_FIELD = {"dropout": "lora_dropout", "targets": "target_preset"}


def check_same_config(folder: Path, saved: dict[str, Any], config: AdapterConfig) -> None:
    """Before any model loads: the run's adapter config must be the checkpoint's (``--rank 8`` on a rank-4
    checkpoint would fail only after the models load). Fields the run leaves unset (``None``) are not compared."""
    ours = json.loads(json.dumps(config.to_dict()))
    differ = [k for k, v in ours.items() if k not in RESUME_FREE_FIELDS and v is not None and k in saved and saved[k] != v]
    if differ:
        flags = ", ".join(f"--{FLAG_OF_FIELD.get(k, k)} {saved[k]!r} (this run: {ours[k]!r})" for k in differ)
        raise ConfigError(f"checkpoint {folder.parent} was trained with other adapter settings: {flags}. Resume with the "
                          "original flags, or use another --output_dir for a fresh run")


def load_parts(parts: dict[str, nn.Module], folder: str | os.PathLike, method: str | None = None) -> None:
    """Load ``folder/<part>/`` (saved by :func:`save_parts`) into the already-injected parts, exactly."""
    folder = Path(folder)
    if method is not None:
        check_adapter_folder(folder, method, list(parts))
    for part, model in parts.items():
        meta = read_adapter_config(folder / part)
        tensors = read_adapter_weights(folder / part, meta)
        load_tensors_into(model, ADAPTER_NAME, tensors, source=str(folder / part / WEIGHTS_NAME))


@dataclass
class CheckpointManager:
    """Atomic, rotated ``accelerate`` checkpoints in ``<output_dir>/checkpoint-<step>``, as diffusers' scripts
    write them (checkpoints of the older ``<output_dir>/training_state/`` layout are found and resumed too).

    ``save`` has every rank write into ``.checkpoint-<step>.tmp`` (accelerate writes the per-rank
    RNG states there), then rank 0 renames it into place: a killed run leaves either a whole
    checkpoint or none, and ``latest`` ignores leftovers. Only then are old checkpoints rotated
    out (``total_limit``), so the last good one always survives a failure. A checkpoint is written
    only when every trainable parameter is finite.

    Resuming runs no code from the folder (:mod:`mm_subspace.checkpoints`): our state — step, method,
    loss history — is ``trainer_state.json``, the adapters are safetensors, and accelerate's optimizer,
    scheduler and RNG files are read with ``torch.load(weights_only=True)`` only. :meth:`find_resumable`
    checks a checkpoint completely before any model is built; ``latest`` skips broken ones (with a
    warning) and falls back to the previous complete checkpoint.

    Args:
        output_dir: the run's output folder.
        method: adapter method, recorded and checked on resume.
        total_limit: keep at most this many checkpoints (``None`` = all).
        num_processes: the run's world size, recorded; a resume with another one is refused (the lr
            schedule's length and the data order depend on it).
    """

    output_dir: Path
    method: str
    total_limit: int | None = None
    num_processes: int | None = None
    last_saved: Path | None = field(default=None, init=False)
    #: the loss history saved in (and restored from) ``trainer_state.json``
    history: LossHistory | None = field(default=None, init=False)
    #: the fp16 loss scaler's skipped-step counter (:class:`mm_subspace.distributed.SkippedSteps`), saved and
    #: restored with it, so a resumed run keeps its total and the run of consecutive skips it was in
    skipped: Any = field(default=None, init=False)
    #: the trained parts (set by :meth:`register_hooks`): checked finite before every save
    parts: dict[str, nn.Module] = field(default_factory=dict, init=False)

    @property
    def root(self) -> Path:
        """The folder new checkpoints go to: the output folder itself."""
        return Path(self.output_dir)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (in the output folder and the legacy ``training_state/``), oldest first."""
        found = []
        for folder in (self.root, self.root / LEGACY_STATE_DIR):
            if folder.is_dir():
                found += [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
        return sorted(found, key=checkpoint_step)

    def resolve(self, spec: str | None) -> Path | None:
        """Path of the checkpoint ``spec`` names: ``"latest"`` (None if there is none), a path, or a name.

        Raises:
            FileNotFoundError: a named checkpoint does not exist (lists the ones that do).
        """
        if spec is None:
            return None
        if spec == "latest":
            found = self.checkpoints()
            return found[-1] if found else None
        for candidate in (Path(spec), self.root / spec, self.root / Path(spec).name, self.root / LEGACY_STATE_DIR / spec):
            if candidate.is_dir() and os.path.lexists(candidate / TRAINER_STATE):  # find_resumable checks the file
                return candidate
        have = ", ".join(p.name for p in self.checkpoints()) or "none"
        raise FileNotFoundError(
            f"--resume_from_checkpoint {spec}: no such checkpoint (a folder with {TRAINER_STATE}); checkpoints in "
            f"{self.root}: {have}. Pass 'latest', one of those names, or a checkpoint path."
        )

    def validate(self, path: Path, parts: Sequence[str], configs: dict[str, AdapterConfig] | None = None
                 ) -> dict[str, Any]:
        """Check checkpoint ``path`` completely before any model is built; returns its ``trainer_state.json``.

        Raises:
            AdapterFileError: a file of the checkpoint is broken (missing, truncated, not UTF-8, wrong shape).
            ConfigError: the checkpoint is fine but belongs to another run (method, parts, adapter config).
        """
        state = read_trainer_state(path)
        pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
        if pickled:  # accelerate would unpickle them in full (and refuses to load the folder without them)
            raise ConfigError(
                f"checkpoint {path} holds {', '.join(pickled)}: pickled state (written by an older mm_subspace, or put "
                "there) that resuming would have to unpickle, which can run any code. Delete the file(s) to resume "
                "(the loss history before this run is then not restored)"
            )
        if state["method"] != self.method:
            raise ConfigError(
                f"checkpoint {path} belongs to a --adapter {state['method']} run, not {self.method}: resume with "
                f"--adapter {state['method']}, or use another --output_dir for a fresh {self.method} run"
            )
        missing = [p for p in parts if not os.path.lexists(path / p / CONFIG_NAME)]
        if missing:
            raise ConfigError(
                f"checkpoint {path} has no adapter for {missing} (was it trained without --train_text_encoder?); "
                "resume with the same flags as the original run"
            )
        saved_world = state.get("num_processes")
        if self.num_processes is not None and saved_world is not None and saved_world != self.num_processes:
            raise ConfigError(
                f"checkpoint {path} was written by a run on {saved_world} processes, this one has {self.num_processes}: "
                f"the lr schedule (stepped once per process) and the data order depend on it. Resume with "
                f"--num_processes {saved_world} (accelerate launch), or start a fresh run in another --output_dir"
            )
        check_adapter_folder(path, self.method, parts)
        for part in parts:
            meta = read_adapter_config(path / part)
            read_adapter_weights(path / part, meta)  # the checksum: truncated weights are found now
            if configs and part in configs:
                check_same_config(path / part, meta["config"], configs[part])
        check_accelerate_files(path)
        return state

    def check_resumable(self, path: Path, parts: Sequence[str], configs: dict[str, AdapterConfig] | None = None) -> int:
        """:meth:`validate` and return the checkpoint's step."""
        return int(self.validate(path, parts, configs)["step"])

    def find_resumable(self, spec: str | None, parts: Sequence[str], configs: dict[str, AdapterConfig] | None = None
                       ) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint ``--resume_from_checkpoint spec`` names, checked (:meth:`validate`): ``(path, trainer state)``,
        or ``(None, None)`` for no spec or ``latest`` with no checkpoint yet.

        ``latest`` takes the newest checkpoint that passes the check, warning about each broken one it skips. A
        named checkpoint that is broken is an :class:`AdapterFileError` naming it, the problem and the previous
        complete checkpoint to resume from instead.
        """
        if spec is None:
            return None, None
        if spec == "latest":
            found, problems = self.checkpoints(), []
            for path in reversed(found):
                try:
                    return path, self.validate(path, parts, configs)
                except AdapterFileError as err:
                    logger.warning("--resume_from_checkpoint latest: skipping %s, it is broken (%s); trying the "
                                   "previous checkpoint", path.name, err)
                    problems.append(f"{path.name}: {err}")
            if found:
                raise AdapterFileError(f"--resume_from_checkpoint latest: no complete checkpoint in {self.root}; "
                                       f"{'; '.join(problems[:3])}. Start a fresh run (another --output_dir, or "
                                       "delete training_state/)")
            return None, None
        path = self.resolve(spec)
        try:
            return path, self.validate(path, parts, configs)
        except AdapterFileError as err:
            earlier = [p for p in self.checkpoints() if p.resolve() != path.resolve()
                       and (not re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", path.name) or checkpoint_step(p) < checkpoint_step(path))]
            previous = None
            for candidate in reversed(earlier):
                try:
                    self.validate(candidate, parts, configs)
                    previous = candidate
                    break
                except AdapterFileError:
                    continue
            offer = (f"The previous complete checkpoint is {previous}: --resume_from_checkpoint {previous.name}"
                     if previous is not None else "No earlier complete checkpoint is left; start a fresh run")
            raise AdapterFileError(f"checkpoint {path} cannot be resumed: {err}. {offer}") from None

    def restore(self, state: dict[str, Any]) -> None:
        """After ``accelerator.load_state``: the loss history and skipped-step counts of ``state`` (a checked
        ``trainer_state.json``; checkpoints written before the counts were saved restore none)."""
        if self.history is not None:
            self.history.rows = [dict(row) for row in state.get(HISTORY_KEY, [])]
        if self.skipped is not None and SKIPPED_KEY in state:
            self.skipped.load_state_dict(state[SKIPPED_KEY])

    def register_hooks(self, accelerator: Accelerator, parts: dict[str, nn.Module], base_model: str | None = None,
                       export: Callable[[dict[str, nn.Module], Path], None] | None = None) -> None:
        """Make ``accelerator.save_state``/``load_state`` write/read the adapters in our format.

        The hooks pop the models accelerate would otherwise pickle whole (the frozen base too).
        ``export(parts, folder)`` (rank 0) adds files to each checkpoint, e.g. a diffusers LoRA file.
        """
        self.parts = parts
        def find(model: nn.Module) -> str:
            inner = unwrap(accelerator, model)
            for name, part in parts.items():
                if inner is part:
                    return name
            raise ConfigError(f"unexpected model {type(inner).__name__} in save_state; not one of {list(parts)}")

        def save_hook(models: list[nn.Module], weights: list[Any], output_dir: str) -> None:
            names = [find(m) for m in models]
            if accelerator.is_main_process:
                save_parts({n: parts[n] for n in names}, output_dir, base_model)
                if export is not None:
                    export({n: parts[n] for n in names}, Path(output_dir))
            weights.clear()

        def load_hook(models: list[nn.Module], input_dir: str) -> None:
            names = [find(m) for m in models]
            load_parts({n: parts[n] for n in names}, input_dir, self.method)
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def load(self, accelerator: Accelerator, path: Path) -> None:
        """``accelerator.load_state(path)`` with ``weights_only`` (runs no code from the folder); under FSDP2 its DDP
        path, as the adapters are replicated (:func:`mm_subspace.distributed.data_parallel_state`)."""
        from .distributed import data_parallel_state

        with data_parallel_state(accelerator):
            accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        self.last_saved = path

    def save(self, accelerator: Accelerator, step: int, extra: dict[str, Any] | None = None) -> Path:
        """``accelerator.save_state`` into ``checkpoint-<step>`` atomically; then rotate. Call on every rank.

        Raises:
            NonFiniteError: a trainable parameter holds NaN/inf: nothing is written, so the last checkpoint on
                disk stays the last good one.
        """
        bad = nonfinite_parameters(self.parts)
        if bad:
            raise NonFiniteError(
                f"non-finite parameters at step {step}; first NaN/inf appears in adapter parameters {bad[:3]}. Training "
                f"stopped without saving checkpoint-{step}. {_keep_message(self.last_saved)}"
            )
        from .distributed import data_parallel_state

        final = self.root / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.root / f".{final.name}.tmp"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        with data_parallel_state(accelerator):
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "method": self.method, "mixed_precision": accelerator.mixed_precision, **(extra or {})}
            if self.num_processes is not None:
                state["num_processes"] = self.num_processes
            if self.history is not None:
                state[HISTORY_KEY] = self.history.rows
            if self.skipped is not None:
                state[SKIPPED_KEY] = self.skipped.state_dict()
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
            fsync_dir(tmp)
            if final.exists():  # a re-run of the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._rotate()
        accelerator.wait_for_everyone()
        self.last_saved = final
        logger.info("saved checkpoint %s", final)
        return final

    def _rotate(self) -> None:
        if self.total_limit is None:
            return
        found = self.checkpoints()
        for old in found[: max(0, len(found) - self.total_limit)]:
            logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old, self.total_limit)
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def resume_mixed_precision(path: Path | None, requested: str | None) -> str | None:
    """The ``--mixed_precision`` to resume checkpoint ``path`` with (call before creating the Accelerator).

    Not given (``None``): the checkpoint's own, restored with a log line, so an fp16 run does not silently go on in
    fp32. Given and different: kept, with a warning naming both. Checkpoints that recorded none: ``requested``.
    """
    if path is None:
        return requested
    try:
        recorded = read_trainer_state(path).get("mixed_precision")
    except AdapterFileError:
        return requested  # check_resumable names an unreadable state file (and offers the previous checkpoint)
    if recorded is None or requested == recorded:
        return requested
    if requested is None:
        logger.warning("resuming %s: --mixed_precision %s restored from the checkpoint (pass --mixed_precision to "
                       "choose another)", path, recorded)
        return recorded
    logger.warning("resuming %s, trained with --mixed_precision %s, with --mixed_precision %s: the rest of the run "
                   "trains in another precision; pass --mixed_precision %s to continue as it was", path, recorded,
                   requested, recorded)
    return requested



# -- loss history and plots -------------------------------------------------------------------------
class LossHistory:
    """Per-step scalars (loss, aux loss, lr). Checkpointed as JSON in ``trainer_state.json``
    (``CheckpointManager.history``), never pickled."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def append(self, step: int, **values: float) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in values.items()}})

    def last(self, key: str) -> float | None:
        for row in reversed(self.rows):
            if key in row:
                return row[key]
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(check_history_rows(state.get("rows") if isinstance(state, dict) else state, "loss history"))


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing): ``m_t = s·m_{t-1} + (1-s)·x_t``,
    reported as ``m_t / (1 - s^t)`` so the start is not pulled toward 0; ``smoothing`` in [0, 1)."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = smoothing * m + (1 - smoothing) * x
        out.append(m / (1 - smoothing**t))
    return out


def curve_smoothing(n: int) -> float:
    """EMA smoothing for a curve of ``n`` points: an effective window of about n/10 points, from 1 (none) to 50."""
    return 1 - 1 / max(1.0, min(50.0, n / 10))


def save_loss_curve(history: LossHistory, path: str | os.PathLike, title: str = "training loss") -> Path:
    """Plot every recorded series except ``step``/``lr`` against the step: the raw values faint, their EMA
    (:func:`ema`, :func:`curve_smoothing`) on top, so the trend reads even at batch 1; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt


    keys = [k for k in dict.fromkeys(k for r in history.rows for k in r) if k not in ("step", "lr")]
    keys = [k for k in keys if any(r.get(k, 0.0) != 0.0 for r in history.rows)]  # e.g. no aux loss at all
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in keys:
        rows = [r for r in history.rows if key in r]
        steps, values = [r["step"] for r in rows], [r[key] for r in rows]
        smoothing = curve_smoothing(len(rows))
        if smoothing == 0:
            ax.plot(steps, values, label=key, marker=".")
            continue
        raw = ax.plot(steps, values, alpha=0.3, linewidth=0.8, label=f"{key} (raw)")[0]
        ax.plot(steps, ema(values, smoothing), color=raw.get_color(), linewidth=2,
                label=f"{key} (EMA, smoothing {smoothing:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if keys:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (tmp,):
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


#: grids show each image at least this many pixels on its short side (smaller ones upscaled, nearest neighbour)
GRID_MIN_SIZE = 256


def image_grid(images: Sequence[PIL.Image.Image], cols: int | None = None, min_size: int = 0) -> PIL.Image.Image:
    """Tile ``images`` into a grid, ``cols`` wide (default: ~square); cells are the largest image's size.

    ``min_size``: images whose short side is smaller are upscaled by the smallest whole factor that reaches it,
    nearest neighbour (each pixel a sharp block: a 32 px sample becomes 256 px, not a blur or a speck).
    """
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    smallest = min(min(im.size) for im in images)
    factor = math.ceil(min_size / smallest) if min_size > smallest else 1
    if factor > 1:
        images = [im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST) for im in images]
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = max(im.width for im in images), max(im.height for im in images)  # images of other sizes: top-left of a cell
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def save_image_grid(images: Sequence[PIL.Image.Image], path: str | os.PathLike, cols: int | None = None,
                    min_size: int = GRID_MIN_SIZE) -> Path:
    """:func:`image_grid` saved as PNG atomically (small images upscaled to ``min_size``, nearest)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path) as (tmp,):
        image_grid(images, cols, min_size).save(tmp, format="PNG")
    return path


# -- model card -------------------------------------------------------------------------------------
def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    title: str,
    base_model: str | None,
    method: str,
    summary: dict[str, Any],
    flags: dict[str, Any],
    images: dict[str, str] | None = None,
    sections: dict[str, str] | None = None,
    tags: Sequence[str] = (),
    front_matter: dict[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/README.md``: YAML front matter, a summary table, images, sections, all flags.

    Args:
        title: heading.
        base_model: base model id (front matter ``base_model``; ``None`` leaves it out, e.g. a local folder).
        method: adapter method (front matter tag, summary).
        summary: key facts (steps, final loss, export status), one table row each.
        flags: every command-line flag and its value.
        images: caption -> path relative to ``output_dir``.
        sections: heading -> Markdown body (usage, notes).
        tags: extra front-matter tags.
        front_matter: more YAML keys (``license``, ``instance_prompt``, ``widget``...), values written as
            JSON (valid YAML); ``None`` values are left out.
    """
    from .registry import get_method

    adapter_cls = get_method(method)
    lines = ["---", *([f"base_model: {json.dumps(str(base_model))}"] if base_model else []), "library_name: mm_subspace", "tags:"]
    lines += [f"- {t}" for t in dict.fromkeys(("mm-subspace", method, *tags))]
    lines += [f"{key}: {json.dumps(value)}" for key, value in (front_matter or {}).items() if value is not None]
    lines += ["---", "", f"# {title}", ""]
    lines += [f"Adapter method **{method}**: `ΔW = {adapter_cls.formula}` ({adapter_cls.paper}).", ""]
    lines += ["| | |", "|---|---|"] + [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in summary.items()] + [""]
    for caption, rel in (images or {}).items():
        lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", body.strip(), ""]
    lines += ["## Training flags", "", "| flag | value |", "|---|---|"]
    lines += [f"| `--{k}` | {_md_cell(v)} |" for k, v in sorted(flags.items())] + [""]
    path = Path(output_dir) / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def adapter_summary(parts: dict[str, nn.Module]) -> dict[str, str]:
    """``{part: "N modules, P trainable parameters"}`` for the model card and the log."""
    out = {}
    for part, model in parts.items():
        get_state(model)
        n_layers = sum(1 for _ in adapter_layers(model))
        n_params = sum(p.numel() for _, p in trainable_named_parameters(model))
        out[part] = f"{n_layers} modules, {n_params:,d} trainable parameters"
    return out
