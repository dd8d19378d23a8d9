"""The ``mm-subspace`` command line: train, compare, inspect, convert, import and merge adapters.

::

    mm-subspace dreambooth --adapter moslora                 # training/dreambooth_sdxl.py, from any directory
    mm-subspace visual-instruction --adapter moslora         # training/visual_instruction.py
    mm-subspace compare --adapters runs/                     # apps/compare.py (Gradio)

    mm-subspace inspect out/adapter
    mm-subspace export out/adapter --to kohya out/my_lora.safetensors
    mm-subspace import-moslora official_ckpt/ out/diffusers_lora --to diffusers --component unet
    mm-subspace merge --base path/to/model --adapter out/adapter out/merged
    mm-subspace recipes [NAME] [--family llava]

``dreambooth``, ``visual-instruction`` and ``compare`` run the installed scripts
(:mod:`mm_subspace.training.dreambooth_sdxl`, :mod:`mm_subspace.training.visual_instruction`,
:mod:`mm_subspace.apps.compare`): every argument after the command goes to the script untouched, and
``-h`` prints the script's own help. On several processes: ``accelerate launch -m mm_subspace.cli dreambooth ...``
(or ``-m mm_subspace.training.dreambooth_sdxl ...``).

The other subcommands work from folders on disk (``export`` and ``import-moslora`` do not even need
the base model: the adapters are rebuilt on stand-ins of the recorded shapes). Bad input prints one
``error: ...`` line naming the fix and exits with status 2 (usage) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, SubspaceError
from .formats import FORMATS, KOHYA_PREFIX

logger = logging.getLogger(__name__)

COMPONENTS = tuple(KOHYA_PREFIX)
#: files of a transformers model folder that ``AutoProcessor`` reads (a processor, or a tokenizer alone)
PREPROCESSING_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")

#: ``mm-subspace NAME ARGS...``: module whose command line runs with ARGS untouched, and its one-line help
SCRIPTS: dict[str, tuple[str, str]] = {
    "dreambooth": ("mm_subspace.training.dreambooth_sdxl",
                   "train an SDXL adapter with DreamBooth (training/dreambooth_sdxl.py; -h: its flags)"),
    "visual-instruction": ("mm_subspace.training.visual_instruction",
                           "visual-instruction tuning of a LLaVA (training/visual_instruction.py; -h: its flags)"),
    "compare": ("mm_subspace.apps.compare", "side-by-side comparison app, Gradio (apps/compare.py; -h: its flags)"),
}


def _add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--component", choices=COMPONENTS, default=None,
        help="SDXL component a single adapter belongs to (default: from the recorded base class)",
    )
    parser.add_argument(
        "--layers-per-block", type=int, default=None,
        help="the UNet's layers_per_block, for kohya names (default: SDXL's 2)",
    )
    parser.add_argument(
        "--no-strict", dest="strict", action="store_false",
        help="load what fits and list every ignored key instead of failing",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="write into an existing, non-empty output (never allowed: the input itself or a path inside/around it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm-subspace",
        description="Train, compare, inspect, convert, import and merge mm_subspace adapters (LoRA, MoSLoRA, TS-Mixing, ...).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_) in SCRIPTS.items():  # listed in --help; main() hands their arguments over untouched
        sub.add_parser(name, help=help_, add_help=False).add_argument("script_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("inspect", help="print method, rank, targets, trainable parameters, base fingerprint",
                       description="Describe a saved adapter folder (or a pipeline adapter folder with unet/, "
                                   "text_encoder/, text_encoder_2/).")
    p.add_argument("dir", help="adapter folder saved by mm_subspace.save_adapter")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("export", help="convert a saved adapter to peft, diffusers or kohya",
                       description="Convert a saved adapter without loading the base model. Mixers are folded "
                                   "into B exactly; alpha is kept (peft, kohya) or folded into B (diffusers).")
    p.add_argument("dir", help="adapter folder, or pipeline adapter folder with unet/ text_encoder/ text_encoder_2/")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("out", help="output folder (kohya: a .safetensors file)")
    _add_layout_args(p)

    p = sub.add_parser("import-moslora", help="convert an official MoSLoRA checkpoint (lora_A, lora_AB, lora_B)",
                       description="Read a checkpoint of the official MoSLoRA code (PEFT adapter_config.json + "
                                   "adapter_model.safetensors/.bin with lora_AB, or the SDXL script's "
                                   "pytorch_lora_weights.safetensors with lora.downB) and write it as an mm_subspace "
                                   "moslora adapter, or in one step as diffusers / kohya / peft LoRA with the "
                                   "mixer folded into B.")
    p.add_argument("src", help="official MoSLoRA checkpoint folder")
    p.add_argument("out", help="output folder (kohya: a .safetensors file)")
    p.add_argument("--to", choices=FORMATS, default="mm_subspace", help="output format (default: mm_subspace)")
    _add_layout_args(p)

    p = sub.add_parser("merge", help="fold an adapter into a base model and save_pretrained it",
                       description="Load the base (a transformers model folder, a diffusers model folder such as "
                                   "unet/, or a diffusers pipeline folder with model_index.json), load the "
                                   "adapter, merge it into the weights and save the plain model.")
    p.add_argument("--base", required=True, help="local base model folder")
    p.add_argument("--adapter", required=True, help="adapter folder (pipeline adapter folder for a pipeline base)")
    p.add_argument("out", help="output folder")
    p.add_argument("--component", choices=COMPONENTS, default=None,
                   help="for a pipeline base and a single adapter: the component it adapts")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty output folder")

    p = sub.add_parser("recipes", help="list the paper recipes (--recipe NAME of the training scripts), or describe one",
                       description="List the recipes of mm_subspace.recipes (MoSLoRA, SuLoRA and the subspace-tuning "
                                   "survey's experiments) with family, method and citation, or print one in full.")
    p.add_argument("name", nargs="?", default=None, help="a recipe name: print its config, training values and notes")
    p.add_argument("--family", default=None, help="only recipes of this model family (llama, llava, sdxl, roberta, ...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _check_output(out: str, force: bool, *inputs: str, nested: bool = True) -> None:
    """Refuse an output that is an input (``nested``: or inside/around one), and an existing non-empty one without --force."""
    from .formats import refuse_overlapping_paths

    for source in inputs:
        if nested:
            try:
                refuse_overlapping_paths(source, out, "input")
            except ConfigError:
                return  # the converter refuses it, after it has checked the input itself
        elif Path(source).resolve() == Path(out).resolve():
            raise ConfigError(f"the output {out} is the input {source}: writing there would overwrite it; choose another path")
    path = Path(out)
    occupied = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if occupied and not force:
        raise ConfigError(f"the output {out} already exists and is not empty; pass --force to overwrite it, or choose another path")


# -- commands -------------------------------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> int:
    from .formats import adapter_components, describe_adapter

    folders = adapter_components(args.dir)
    described = {str(c) if c else "model": describe_adapter(f).as_dict() for c, f in folders.items()}
    if args.json:
        print(json.dumps(described if len(described) > 1 else next(iter(described.values())), indent=2))
        return 0
    for component, info in described.items():
        if len(described) > 1:
            print(f"[{component}]")
        for key in ("method", "rank", "alpha", "modules", "targets", "trainable_params", "dtype",
                    "base_class", "base_name_or_path", "base_fingerprint"):
            value = info[key]
            if key == "targets":
                value = ", ".join(value)
            elif key == "trainable_params":
                value = f"{value:,d}"
            print(f"{key:18s} {value}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .formats import convert_adapter

    _check_output(args.out, args.force, args.dir)
    out = convert_adapter(args.dir, args.out, args.to, component=args.component,
                          layers_per_block=args.layers_per_block, strict=args.strict)
    print(f"wrote {args.to} adapter to {out}")
    return 0


def _import_moslora(args: argparse.Namespace) -> int:
    from .formats import convert_official_moslora

    _check_output(args.out, args.force, args.src)
    out = convert_official_moslora(args.src, args.out, to=args.to, component=args.component,
                                   layers_per_block=args.layers_per_block, strict=args.strict)
    print(f"wrote {args.to} adapter to {out}")
    return 0


def _load_base(folder: Path) -> tuple[Any, str]:
    """(model or pipeline, kind) from a local folder: 'pipeline', 'diffusers' or 'transformers'."""
    if not folder.is_dir():
        raise ConfigError(f"--base {folder} is not a folder; give a local model folder (save_pretrained output)")
    index = folder / "model_index.json"
    if index.is_file():
        _read_json(index)
        from diffusers import DiffusionPipeline

        return _from_pretrained(DiffusionPipeline, folder, index), "pipeline"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--base {folder} has neither model_index.json (diffusers pipeline) nor config.json (model)")
    cfg = _read_json(cfg_path)
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, str(cfg["_class_name"]), None)
        if not isinstance(cls, type):
            raise ConfigError(f"--base {folder}: diffusers has no model class {cfg['_class_name']!r}")
        return _from_pretrained(cls, folder, cfg_path), "diffusers"
    import transformers

    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"--base {cfg_path}: 'architectures' must be a list of class names, got {archs!r:.100}")
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if not isinstance(cls, type):
        raise ConfigError(f"--base {folder}: transformers has no class {archs[0]!r}; upgrade transformers")
    return _from_pretrained(cls, folder, cfg_path), "transformers"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"--base {path} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--base {path} must hold a JSON object, found {type(data).__name__}")
    return data


def _from_pretrained(cls: Any, folder: Path, config_path: Path) -> Any:
    """``cls.from_pretrained(folder)`` offline; whatever the library raises on a broken folder is a user error."""
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError, RuntimeError, ImportError) as err:
        raise ConfigError(
            f"--base {folder}: {cls.__name__}.from_pretrained failed ({type(err).__name__}: {str(err)[:300]}); "
            f"check {config_path.name} and the weight files"
        ) from None


def _merge(args: argparse.Namespace) -> int:
    from .formats import adapter_components
    from .inject import merge_and_unload
    from .io import base_fingerprint, load_adapter, read_adapter_config

    base_dir, out = Path(args.base), Path(args.out)
    folders = adapter_components(args.adapter, args.component)  # validates the adapter before the slow load
    _check_output(args.out, args.force, args.base, args.adapter, nested=False)
    base, kind = _load_base(base_dir)
    if kind == "pipeline":
        if None in folders:
            raise ConfigError("a pipeline base needs a pipeline adapter folder (unet/, text_encoder/, ...) or --component")
        targets = {c: getattr(base, str(c), None) for c in folders}
        missing = [c for c, m in targets.items() if m is None]
        if missing:
            raise ConfigError(f"pipeline {base_dir} has no component(s) {missing}")
    else:
        if len(folders) > 1:
            raise ConfigError(f"{args.adapter} holds adapters for a pipeline ({sorted(map(str, folders))}); "
                              "pass the pipeline folder (with model_index.json) as --base")
        targets = {c: base for c in folders}
    for component, model in targets.items():
        meta = read_adapter_config(folders[component])
        load_adapter(model, folders[component])
        recorded = (meta.get("base_model") or {}).get("fingerprint")
        merge_and_unload(model)
        if recorded and recorded != base_fingerprint(model):
            logger.warning("%s: the base's fingerprint differs from the one the adapter was saved with "
                           "(%s); shapes match, so it was merged anyway", component or base_dir, recorded)
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out)
    if kind == "transformers" and any((base_dir / n).is_file() for n in PREPROCESSING_FILES):
        # the full processor (LLaVA: image processor, tokenizer, chat template), or the tokenizer alone
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(base_dir, local_files_only=True).save_pretrained(out)
    elif kind == "pipeline":
        from .compat import declare_float32_configs

        declare_float32_configs(out)  # stock from_pretrained(out) without torch_dtype: one dtype throughout
    print(f"merged {', '.join(str(c or 'model') for c in folders)} into {out}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    import dataclasses

    from .recipes import get_recipe, list_recipes

    if args.name:
        recipe = get_recipe(args.name)
        print(json.dumps(dataclasses.asdict(recipe), indent=2) if args.json else recipe.describe())
        return 0
    recipes = [get_recipe(n) for n in list_recipes(args.family)]
    if args.json:
        print(json.dumps([{"name": r.name, "family": r.family, "method": r.method, "cite": r.cite} for r in recipes],
                         indent=2))
        return 0
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        print(f"{r.name:{width}s}  {r.family:12s} {r.method:16s} {r.cite}")
    return 0


@contextlib.contextmanager
def _script_argv(prog: str, argv: list[str]) -> Iterator[None]:
    """``sys.argv`` as the script would see it when run directly (its help then says ``usage: mm-subspace NAME``)."""
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def report_errors(prog: str, run: Callable[[], Any]) -> int:
    """Run ``run()``; return its exit status: 0, argparse's for ``SystemExit``, or 1 after printing a
    :class:`SubspaceError` (bad flags, data, config, an unreachable hub id) as one ``<prog>: error: ...`` line."""
    try:
        run()
    except SystemExit as exit_:  # argparse: 0 after --help, 2 for a usage error
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except SubspaceError as err:  # bad flags / data / config: one line naming the fix
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


def run_script(name: str, argv: Sequence[str]) -> int:
    """Run the command line of script ``name`` (a key of :data:`SCRIPTS`) with ``argv``; returns the exit status.

    The training scripts run ``main(parse_args(argv))``, the app ``main(argv)``: the same code as
    ``accelerate launch training/dreambooth_sdxl.py ARGS`` or ``python apps/compare.py ARGS``.
    """
    module = importlib.import_module(SCRIPTS[name][0])
    argv = list(argv)

    def run() -> None:
        with _script_argv(f"mm-subspace {name}", argv):
            if hasattr(module, "parse_args") and name != "compare":
                module.main(module.parse_args(argv))
            else:
                module.main(argv)

    return report_errors(f"mm-subspace {name}", run)


COMMANDS = {"recipes": _recipes, "inspect": _inspect, "export": _export, "import-moslora": _import_moslora, "merge": _merge}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mm-subspace``; returns the exit status (0 ok, 1 bad input/file, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] in SCRIPTS:  # everything after the name belongs to the script
        if any(a in ("-v", "--verbose") for a in argv[:first]):
            logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
        return run_script(argv[first], argv[first + 1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse prints usage; keep its status (0 for --help, 2 for usage errors)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (SubspaceError, OSError) as err:
        print(f"mm-subspace {args.command}: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # never a traceback for bad input; -v shows it for bug reports
        if args.verbose:
            logger.exception("unexpected error")
        print(f"mm-subspace {args.command}: error: {type(err).__name__}: {err} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
