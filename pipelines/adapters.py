"""Find saved adapters on disk and describe them (name, family, method, rank, parameters).

Two layouts are recognised, both written by :func:`mm_subspace.save_adapter`:

* a flat adapter folder: ``<dir>/adapter_config.json`` + ``adapter_model.safetensors`` — the
  family (SDXL or LLaVA/LLaMA) is read from ``base_model.class`` in the config;
* a DreamBooth output folder (``training/dreambooth_sdxl.py``, default ``runs/dreambooth-sdxl-<adapter>``):
  one adapter folder per adapted pipeline component, ``unet/``, and optionally ``text_encoder/`` and
  ``text_encoder_2/``.

Nothing here touches a model; :mod:`mm_subspace.pipelines.sdxl` and :mod:`mm_subspace.pipelines.llava` load what this finds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_subspace.errors import HubError, SubspaceError
from mm_subspace.formats import describe_adapter
from mm_subspace.hub import PIPELINE_ADAPTER_FILES, is_repo_id, resolve
from mm_subspace.io import CONFIG_NAME

logger = logging.getLogger(__name__)

__all__ = ["SDXL_COMPONENTS", "TABLE_HEADERS", "AdapterInfo", "AdapterSet", "adapter_info", "adapter_name_for", "find_adapters"]

#: pipeline components an SDXL adapter folder may hold, as sub-folders of that name
SDXL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: base-model classes (``base_model.class`` in adapter_config.json) of each family
FAMILY_OF_CLASS = {
    "UNet2DConditionModel": "sdxl",
    "CLIPTextModel": "sdxl",
    "CLIPTextModelWithProjection": "sdxl",
    "LlavaForConditionalGeneration": "llava",
    "LlamaForCausalLM": "llava",
}
#: folders of a training run that are not adapters (checkpoints hold optimizer state, not a finished adapter)
SKIP_DIRS = {"training_state", "logs", "validation", "instance_images", "class_images"}
#: resumable checkpoints of a run (``<output_dir>/checkpoint-<step>``, diffusers' layout): skipped like SKIP_DIRS
CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")
#: folder-name prefixes dropped from adapter names (default output folders of our training scripts)
NAME_PREFIXES = ("dreambooth-sdxl-", "llava-")


@dataclass
class AdapterInfo:
    """One adapter found on disk (possibly spanning several pipeline components).

    Attributes:
        name: adapter name used on the model and as the gallery label.
        path: the adapter's root folder.
        parts: component name (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``, or ``"model"``
            for LLaVA/LLaMA) -> folder holding ``adapter_config.json``.
        family: ``"sdxl"``, ``"llava"``, or ``"unknown"`` when the folder cannot be read.
        method, rank, alpha: from the saved config (of the first part).
        params: number of adapter parameters over all parts (read from the safetensors headers).
        base_class / base_name: ``base_model.class`` / ``name_or_path`` recorded at save time.
        compatible: False when the adapter cannot be loaded onto the current base; ``reason`` says why.
    """

    name: str
    path: Path
    parts: dict[str, Path]
    family: str
    method: str = "?"
    rank: int = 0
    alpha: float = 0.0
    params: int = 0
    base_class: str = ""
    base_name: str = ""
    compatible: bool = True
    reason: str = ""
    configs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """``"moslora r=4 · 12,345 params"`` (or the incompatibility reason)."""
        if not self.compatible:
            return f"incompatible: {self.reason}"
        return f"{self.method} r={self.rank} α={self.alpha:g} · {self.params:,d} params"

    def row(self) -> list[Any]:
        """Table row: name, family, method, rank, alpha, params, parts, status."""
        status = "ok" if self.compatible else f"incompatible: {self.reason}"
        return [self.name, self.family, self.method, self.rank, self.alpha, self.params, "+".join(self.parts), status]


TABLE_HEADERS = ["adapter", "family", "method", "rank", "alpha", "params", "components", "status"]


def adapter_name_for(folder: Path) -> str:
    """Adapter name from a folder name: known training-script prefixes dropped, only ``[A-Za-z0-9_-]`` kept."""
    name = folder.name
    for prefix in NAME_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix):]
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_") or "adapter"
    return name


def adapter_info(root: Path, name: str | None = None) -> AdapterInfo | None:
    """The adapter rooted at ``root`` (each part described by :func:`mm_subspace.describe_adapter`);
    ``None`` if ``root`` holds no adapter.

    A folder that looks like an adapter but cannot be read is returned with ``compatible=False``
    and the reason, so a UI can list it instead of crashing: truncated or garbage weights, and a FIFO,
    device or folder where ``adapter_config.json`` or ``adapter_model.safetensors`` belongs (never opened
    for reading, so a FIFO cannot block).
    """
    root = Path(root)
    # lexists: a config that is a FIFO, a folder or a dangling link is listed with that reason, not skipped
    if os.path.lexists(root / CONFIG_NAME):
        parts = {"": root}
    else:
        parts = {c: root / c for c in SDXL_COMPONENTS if os.path.lexists(root / c / CONFIG_NAME)}
    if not parts:
        return None
    info = AdapterInfo(name=name or adapter_name_for(root), path=root, parts={}, family="sdxl")
    try:
        described = {component: describe_adapter(folder) for component, folder in parts.items()}
        info.configs = {component: d.meta for component, d in described.items()}
        info.params = sum(d.trainable_params for d in described.values())
        first_described = next(iter(described.values()))
        first, config = first_described.meta, first_described.config
        info.method, info.rank, info.alpha = config.method, int(config.rank), float(config.alpha)
        info.base_class = str(first_described.base_class or "")
        info.base_name = str(first_described.base_name_or_path or "")
        if "" in parts:  # flat folder: family and component from the recorded base class
            info.family = FAMILY_OF_CLASS.get(info.base_class, "sdxl" if "unet" in info.base_class.lower() else "llava")
            component = "unet" if info.family == "sdxl" else "model"
            if info.family == "sdxl" and info.base_class.startswith("CLIPTextModel"):
                component = "text_encoder_2" if info.base_class.endswith("WithProjection") else "text_encoder"
            info.configs = {component: first}
            parts = {component: root}
    except (SubspaceError, OSError, ValueError) as err:
        info.compatible, info.reason, info.family = False, f"unreadable adapter: {err}", "unknown"
    info.parts = parts
    return info


def find_adapters(dirs: Iterable[str | os.PathLike[str]], max_depth: int = 3) -> list[AdapterInfo]:
    """Every adapter under ``dirs`` (each a folder of adapters, or an adapter folder itself).

    One broken folder never stops the search: an adapter that cannot be read is in the list with
    ``compatible=False`` and the reason (see :func:`adapter_info`); a folder that cannot be listed is
    skipped with a warning.

    Names are unique within a family: a repeated name gets ``-2``, ``-3``... Sorted by family, then path.
    """
    found: list[AdapterInfo] = []
    seen: set[Path] = set()

    def visit(folder: Path, depth: int) -> None:
        try:
            resolved = folder.resolve()
            if resolved in seen or not folder.is_dir():
                return
            info = adapter_info(folder)
            if info is not None:
                seen.add(resolved)
                found.append(info)
                return
            if depth >= max_depth:
                return
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                              and p.name not in SKIP_DIRS and not CHECKPOINT_DIR.fullmatch(p.name))
        except (OSError, RuntimeError) as err:  # unreadable folder, symlink loop (RuntimeError before Python 3.13)
            logger.warning("skipping %s: %s", folder, err)
            return
        for child in children:
            visit(child, depth + 1)

    for d in dirs:
        folder = Path(d).expanduser()
        if isinstance(d, str) and "/" in d.strip("/") and not os.path.lexists(folder) and is_repo_id(d):
            try:  # owner/name that is no local folder: a Hub repository of adapters
                folder = resolve(d, PIPELINE_ADAPTER_FILES)
            except HubError as err:
                logger.warning("skipping %s: %s", d, err)
                continue
        visit(folder, 0)
    found.sort(key=lambda i: (i.family, str(i.path)))
    used: dict[tuple[str, str], int] = {}
    for info in found:  # unique per family: the two families load into different pipelines
        key = (info.family, info.name)
        used[key] = used.get(key, 0) + 1
        if used[key] > 1:
            info.name = f"{info.name}-{used[key]}"
    return found


class AdapterSet:
    """Several named adapters on the components of one pipeline, switched together.

    ``components`` maps a component name to its ``nn.Module`` (``{"unet": ..., "text_encoder": ...}``
    for SDXL, ``{"model": ...}`` for LLaVA). An adapter may adapt only some components (a UNet-only
    DreamBooth run); the others run their base weights for it. Every operation goes through
    mm_subspace's own functions (``load_adapter``, ``set_adapter``, ``set_scale``, ``merge``,
    ``unmerge``, ``forward_context``); this class only fans them out over the components.
    """

    family = ""

    def __init__(self, components: dict[str, Any]) -> None:
        self.components = components
        self.adapters: dict[str, AdapterInfo] = {}
        self.incompatible: dict[str, AdapterInfo] = {}
        self.active: list[str] = []
        self.disabled = False
        self.scales: dict[str, float] = {}

    # -- loading ----------------------------------------------------------------------------------
    def _with_state(self) -> dict[str, Any]:
        """Components that carry mm_subspace adapters."""
        from mm_subspace.inject import get_state

        return {c: m for c, m in self.components.items() if get_state(m, required=False) is not None}

    def check(self, info: AdapterInfo) -> AdapterInfo:
        """Mark ``info`` incompatible (with the reason) unless every part fits this pipeline's base."""
        from mm_subspace.errors import IncompatibleAdapterError
        from mm_subspace.io import check_compatible

        if not info.compatible:
            return info
        if info.family != self.family:
            info.compatible = False
            info.reason = f"a {info.family} adapter (base {info.base_class or '?'}), this is the {self.family} pipeline"
            return info
        unknown = [c for c in info.parts if c not in self.components]
        if unknown:
            info.compatible = False
            info.reason = f"adapts {unknown}, which this pipeline does not have (it has {list(self.components)})"
            return info
        for component, meta in info.configs.items():
            try:
                check_compatible(self.components[component], meta["modules"], where=f"{component} adapter")
            except IncompatibleAdapterError as err:
                info.compatible, info.reason = False, str(err)
                return info
        return info

    def load_adapter(self, path: str | os.PathLike[str] | AdapterInfo, name: str | None = None) -> AdapterInfo:
        """Load one adapter (a flat adapter folder, a DreamBooth output folder, or a Hub id of either) under ``name``.

        Raises :class:`mm_subspace.IncompatibleAdapterError` (or ``AdapterFileError``) with the reason
        if it does not fit; the pipeline is then unchanged. Use :meth:`load_adapters` to collect
        such adapters as reports instead.
        """
        from mm_subspace.errors import AdapterFileError, AdapterStateError, IncompatibleAdapterError
        from mm_subspace.inject import remove_adapter
        from mm_subspace.io import load_adapter

        if isinstance(path, str) and not os.path.lexists(Path(path).expanduser()):
            local = resolve(path, PIPELINE_ADAPTER_FILES)  # a hub id: only the adapter files are fetched
            if local != Path(path).expanduser():
                name = name or adapter_name_for(Path(path))  # named after the repository, not the cache folder
            path = local
        info = path if isinstance(path, AdapterInfo) else adapter_info(Path(path), name)
        if info is None:
            raise AdapterFileError(
                f"{path} holds no adapter: expected adapter_config.json, or unet/ (text_encoder/, text_encoder_2/) "
                "sub-folders with one, as written by mm_subspace.save_adapter or training/dreambooth_sdxl.py"
            )
        if name is not None:
            info.name = name
        if info.name in self.adapters:
            raise AdapterStateError(f"an adapter named {info.name!r} is already loaded; pass another name")
        self.check(info)
        if not info.compatible:
            if info.reason.startswith("unreadable"):
                raise AdapterFileError(f"{info.path}: {info.reason}")
            raise IncompatibleAdapterError(f"{info.path}: {info.reason}")
        done: list[str] = []
        try:
            for component, folder in info.parts.items():
                load_adapter(self.components[component], folder, adapter_name=info.name, activate=False)
                done.append(component)
        except BaseException:
            for component in done:
                remove_adapter(self.components[component], info.name)
            raise
        self.adapters[info.name] = info
        self.scales[info.name] = 1.0
        self._apply()
        return info

    def load_adapters(self, infos: Iterable[AdapterInfo | str | os.PathLike[str]]) -> list[AdapterInfo]:
        """Load each adapter that fits; the others are returned with ``compatible=False`` and a reason."""
        out = []
        for item in infos:
            info = item if isinstance(item, AdapterInfo) else adapter_info(Path(item))
            if info is None:
                continue
            if info.family != self.family and info.family != "unknown":
                continue  # the other pipeline's adapters: not an error here
            try:
                self.load_adapter(info)
            except SubspaceError as err:
                info.compatible = False
                info.reason = info.reason or str(err)
                self.incompatible[info.name] = info
                logger.warning("adapter %s not loaded: %s", info.path, info.reason)
            out.append(info)
        return out

    # -- switching ----------------------------------------------------------------------------------
    def _check(self, names: Iterable[str | None]) -> None:
        from mm_subspace.errors import AdapterStateError

        unknown = [n for n in names if n is not None and n not in self.adapters]
        if unknown:
            bad = [f"{n} ({self.incompatible[n].reason})" for n in unknown if n in self.incompatible]
            raise AdapterStateError(
                f"unknown adapter(s) {unknown}; loaded: {list(self.adapters)}"
                + (f"; not loadable: {bad}" if bad else "")
            )

    def _apply(self) -> None:
        """Push ``active`` / ``disabled`` to every component's mm_subspace state."""
        from mm_subspace.inject import get_state, list_adapters, set_adapter

        for module in self._with_state().values():
            present = set(list_adapters(module))
            set_adapter(module, [n for n in self.active if n in present])
            get_state(module).disabled = self.disabled

    def set_adapter(self, names: str | list[str] | None) -> None:
        """Activate adapter ``names`` (several are applied in order); ``None`` or ``[]`` = the base."""
        names = [] if names is None else [names] if isinstance(names, str) else list(names)
        self._check(names)
        if self.is_merged() and names != self.active:
            self.unmerge()
        self.active, self.disabled = names, False
        self._apply()

    def enable_adapters(self, enabled: bool = True) -> None:
        """Turn the active adapters on or off (off = the base pipeline); unmerges first when turning off."""
        if not enabled and self.is_merged():
            self.unmerge()
        self.disabled = not enabled
        self._apply()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """``with pipe.disable_adapters(): ...`` runs the base model, then restores the previous state."""
        from mm_subspace.inject import disable_adapters

        with contextlib.ExitStack() as stack:
            for module in self._with_state().values():
                stack.enter_context(disable_adapters(module))
            yield

    def set_scale(self, name: str, scale: float) -> None:
        """Multiply adapter ``name``'s update by ``scale`` on every component it adapts."""
        from mm_subspace.inject import list_adapters, set_scale

        self._check([name])
        if self.scales.get(name) == float(scale):
            return
        for module in self._with_state().values():
            if name in list_adapters(module):
                set_scale(module, name, float(scale))
        self.scales[name] = float(scale)

    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights for speed; :meth:`unmerge` undoes it."""
        from mm_subspace.inject import list_adapters, merge

        names = list(self.active if names is None else names)
        self._check(names)
        modules = self._with_state()
        for module in modules.values():  # mm_subspace.merge validates before it writes a weight
            present = [n for n in names if n in list_adapters(module)]
            if present:
                merge(module, present)

    def unmerge(self) -> None:
        from mm_subspace.inject import unmerge

        for module in self._with_state().values():
            unmerge(module)

    def is_merged(self) -> bool:
        from mm_subspace.inject import adapter_layers

        return any(layer.merged for m in self._with_state().values() for _, layer in adapter_layers(m))

    def batch_rows(self, adapters: Sequence[str | None], scales: dict[str, float] | None, what: str) -> list[str | None]:
        """The row list of a batched call: non-empty, with ``scales`` (``set_scale``) applied first and kept."""
        rows = list(adapters)
        if not rows:
            raise ValueError(f"{what} needs at least one adapter name (or None for the base)")
        for name, scale in (scales or {}).items():
            self.set_scale(name, scale)
        return rows

    @contextlib.contextmanager
    def routed(self, rows: list[str | None]) -> Iterator[None]:
        """Route batch row ``i`` (tiled over the batch) through adapter ``rows[i % K]`` (``None`` = base).

        Uses ``mm_subspace.forward_context(module, adapter_rows=...)`` on every component; a
        component that lacks an adapter runs its base weights for that adapter's rows.
        """
        from mm_subspace.inject import forward_context, get_state, list_adapters, set_adapter

        self._check(rows)
        if self.is_merged():
            logger.info("unmerging before a routed (multi-adapter) forward")
            self.unmerge()
        with contextlib.ExitStack() as stack:
            for module in self._with_state().values():
                present = set(list_adapters(module))
                module_rows = [r if r in present else None for r in rows]
                state = get_state(module)
                before = (list(state.active), state.disabled)
                stack.callback(self._restore, module, before)
                routed_names = [r for r in dict.fromkeys(module_rows) if r is not None]
                set_adapter(module, routed_names)
                state.disabled = False
                stack.enter_context(forward_context(module, adapter_rows=module_rows))
            yield

    @staticmethod
    def _restore(module: Any, before: tuple[list[str], bool]) -> None:
        from mm_subspace.inject import get_state, set_adapter

        set_adapter(module, before[0])
        get_state(module).disabled = before[1]

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Run with only adapter ``name`` active (``None`` = base), then restore the previous selection."""
        self._check([name])
        before = (list(self.active), self.disabled)
        if self.is_merged() and ([name] != self.active or self.disabled):
            self.unmerge()
        try:
            if name is None:
                self.active, self.disabled = [], True
            else:
                self.active, self.disabled = [name], False
            self._apply()
            yield
        finally:
            self.active, self.disabled = before
            self._apply()
