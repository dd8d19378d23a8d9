"""Side-by-side comparison of adapters: same prompt, same seed, one labelled image per adapter.

    python apps/compare.py                                   # tiny offline default, adapters from runs/
    python apps/compare.py --adapters runs/ other_runs/ --server_port 7861
    python apps/compare.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0

UI only: every computation is in ``pipelines/`` (``SDXLAdapters.generate_batch`` renders all selected
adapters in one denoising loop; ``LlavaAdapters.answer_batch`` answers with all of them in one batched
``generate``). When the adapters folder holds no SDXL (or LLaVA) adapter and the base is the embedded one,
the demo adapters shipped with the package are served at once (``mm_subspace/weights/demo-adapters``:
lora and moslora from the headline DreamBooth run on the held-out digit 9, and two tiny LLaVA ones; made by
``training/make_demo_adapters.py``, checked against their manifest). For another base model, two small
adapters are trained first with ``training/dreambooth_sdxl.py`` (``--demo_steps`` steps).
Adapters made for another base model are listed with the reason instead of loaded.

API (``gradio_client``): ``/generate`` takes ``prompt, negative_prompt, seed, num_inference_steps,
guidance_scale, width, height, adapters, scales, batched`` and returns ``images, details, status``;
``/answer`` takes ``image, question, max_new_tokens, adapters, scales, batched``.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mm_subspace.hub import resolve_model
from mm_subspace.pipelines import (
    BASE_LABEL,
    TABLE_HEADERS,
    AdapterInfo,
    LlavaAdapters,
    RequestTimeout,
    SDXLAdapters,
    check_llava_request,
    check_sdxl_request,
    find_adapters,
)
from mm_subspace.training import dreambooth_sdxl
from mm_subspace.training.demo_adapters import DEMO_METHODS, demo_adapters_path, make_demo_llava_adapter
from mm_subspace.training.script_flags import finite_float

logger = logging.getLogger("compare")

DEFAULT_ADAPTERS_DIR = "runs"
DEFAULT_PROMPT = "a handwritten digit sks"  # the embedded digits SDXL + the DreamBooth default subject (a 9)
REAL_MODEL_PROMPT = "a photo of sks cat"  # with --pretrained_model_name_or_path
DEFAULT_QUESTION = "is the digit even? answer yes or no."
DETAIL_HEADERS = ["adapter", "method", "rank", "params", "seconds", "run"]
ANSWER_HEADERS = ["adapter", "answer", "method", "rank", "params", "seconds", "run"]
#: seconds one SDXL request may take (estimated from the measured speed of this device before it runs)
DEFAULT_REQUEST_SECONDS = 120.0
#: a running request is stopped after this many times its budget (the estimate can be short)
TIMEOUT_FACTOR = 2.0
#: requests waiting in the queue (one runs at a time); more are refused by Gradio until one finishes
DEFAULT_MAX_QUEUE = 8


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare adapters side by side (Gradio app).")
    parser.add_argument("--adapters", nargs="+", default=[DEFAULT_ADAPTERS_DIR],
                        help="folders to search for saved adapters (default: runs/, where the training scripts write)")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="SDXL pipeline folder or hub id (default: the tiny offline SDXL)")
    parser.add_argument("--llava_model_name_or_path", default=None,
                        help="LLaVA (or LLaMA) folder or hub id (default: the tiny offline LLaVA)")
    parser.add_argument("--server_name", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument("--server_port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--demo_steps", type=int, default=None,
                        help="with a base model of your own and no adapter for it: training steps of each demo adapter "
                        "made first (default: training/dreambooth_sdxl.py's own default). The embedded models serve the "
                        "shipped demo adapters instead, at once")
    parser.add_argument("--no_llava", action="store_true", help="only the SDXL tab")
    parser.add_argument("--max_request_seconds", type=finite_float, default=DEFAULT_REQUEST_SECONDS,
                        help="budget of one SDXL request: refused when images x steps x pixels at this device's measured "
                        f"speed would take longer; a running request is stopped after {TIMEOUT_FACTOR:g}x this")
    parser.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait while one runs (one runs at a time)")
    args = parser.parse_args(input_args)
    if args.demo_steps is not None and args.demo_steps < 1:
        parser.error("--demo_steps must be >= 1")
    if args.max_request_seconds <= 0 or args.max_queue < 1:
        parser.error("--max_request_seconds must be > 0 and --max_queue >= 1")
    return args


# -- start-up: find or make adapters ------------------------------------------------------------------
def make_default_sdxl_adapters(out_dir: Path, steps: int | None, pretrained: str | None) -> None:
    """Train two small SDXL adapters (lora, moslora) into ``out_dir`` with the DreamBooth script (``steps`` steps,
    default: the script's own headline run)."""
    for method in DEMO_METHODS:
        target = out_dir / f"dreambooth-sdxl-{method}"
        print(f"no SDXL adapter in {out_dir}: training a small {method} adapter ({steps or 'default'} steps) into {target}")
        argv = ["--adapter", method, "--rank", "4", "--output_dir", str(target), "--report_to", "none"]
        if steps:
            argv += ["--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps)]
        if pretrained:
            argv += ["--pretrained_model_name_or_path", pretrained]
        dreambooth_sdxl.main(dreambooth_sdxl.parse_args(argv))


def make_default_llava_adapters(llava: LlavaAdapters, out_dir: Path, steps: int) -> None:
    """Make two tiny LLaVA adapters (lora, moslora) with a minimal visual-instruction loop, with a progress bar."""
    from tqdm.auto import tqdm

    for method in DEMO_METHODS:
        target = out_dir / f"llava-{method}"
        print(f"no LLaVA adapter in {out_dir}: training a tiny {method} adapter ({6 * steps} steps) into {target}")
        with tqdm(total=6 * steps, desc=f"training {method}") as bar:
            make_demo_llava_adapter(llava, target, method, rank=4, steps=6 * steps, progress=lambda i, n: bar.update(1))


def adapters_to_serve(args: argparse.Namespace) -> tuple[list[AdapterInfo], list[str]]:
    """The adapters of ``--adapters``, plus the shipped demo adapters of each embedded model that has none there;
    and the families (``"sdxl"``, ``"llava"``) with no adapter on a base model of the user's own (trained first).

    Reads adapter files only (no model), so the page can list them before the models are in."""
    found = find_adapters(args.adapters)
    embedded = {"sdxl": args.pretrained_model_name_or_path is None, "llava": args.llava_model_name_or_path is None}
    missing = [f for f in ("sdxl", *(() if args.no_llava else ("llava",))) if not any(i.family == f for i in found)]
    demo_families = [f for f in missing if embedded[f]]
    demos = [i for i in find_adapters([demo_adapters_path()]) if i.family in demo_families] if demo_families else []
    return found + demos, [f for f in missing if not embedded[f]]


def check_model_flags(args: argparse.Namespace) -> None:
    """The model flags name a model folder or a fetchable hub id (else one :class:`HubError` naming what to do)."""
    if args.pretrained_model_name_or_path:
        resolve_model(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", "model_index.json")
    if args.llava_model_name_or_path and not args.no_llava:
        resolve_model(args.llava_model_name_or_path, "--llava_model_name_or_path", "config.json")


def load_all(args: argparse.Namespace) -> tuple[SDXLAdapters, LlavaAdapters | None, list[AdapterInfo]]:
    """Build the pipelines, find the adapters (the shipped demos, or demo ones trained first for a base model of the
    user's own, when there are none) and load them."""
    sd = SDXLAdapters.from_pretrained(args.pretrained_model_name_or_path)
    llava = None if args.no_llava else LlavaAdapters.from_pretrained(args.llava_model_name_or_path)
    out_dir = Path(args.adapters[0])
    found, to_train = adapters_to_serve(args)
    if "sdxl" in to_train:
        make_default_sdxl_adapters(out_dir, args.demo_steps, args.pretrained_model_name_or_path)
    if "llava" in to_train:
        make_default_llava_adapters(llava, out_dir, args.demo_steps or 5)
    if to_train:
        found, _ = adapters_to_serve(args)
    if any(i.path.is_relative_to(demo_adapters_path()) for i in found):
        print(f"no adapter for the embedded model(s) in {', '.join(args.adapters)}: serving the shipped demo adapters "
              f"({demo_adapters_path()}); train your own with `mm-subspace dreambooth` into {out_dir}/")
    infos = sd.load_adapters(found)
    if llava is not None:
        infos += llava.load_adapters(found)
    infos = list({id(i): i for i in infos + found}.values())  # + the other family's when its tab is off
    for info in infos:
        print(f"  {info.name:24s} {info.family:6s} {info.summary()}")
    rate = sd.calibrate()  # the request budget is in seconds on this device
    print(f"SDXL on {sd.device.type}: {rate:.3g} s per megapixel-step; requests over {args.max_request_seconds:g} s are refused")
    return sd, llava, infos


def native_size(model: str | None) -> int:
    """Default image size of an SDXL folder (UNet sample_size × VAE factor) from its config files; 1024 (SDXL's)
    when they cannot be read without downloading (a hub id)."""
    import json

    from mm_subspace.tiny_models import tiny_sdxl_path

    folder = Path(model) if model else tiny_sdxl_path()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 1024


# -- request handling (validation + calls into pipelines/) ------------------------------------------------
def _scales(table: Any, selected: list[str]) -> dict[str, float]:
    """``{adapter: scale}`` from the scale table's rows; a bad number raises ValueError with the row."""
    rows = table.values.tolist() if hasattr(table, "values") else (table.get("data", []) if isinstance(table, dict) else table or [])
    scales = {}
    for row in rows:
        if not row or row[0] not in selected:
            continue
        try:
            value = float(row[1])
        except (TypeError, ValueError):
            raise ValueError(f"scale of {row[0]!r} must be a number, got {row[1]!r}") from None
        if not -10.0 <= value <= 10.0:
            raise ValueError(f"scale of {row[0]!r} must be between -10 and 10, got {value}")
        scales[str(row[0])] = value
    return scales


def _rows(selected: list[str]) -> list[str | None]:
    return [None if name == BASE_LABEL else name for name in selected]


def _info_cells(info: AdapterInfo | None) -> list[Any]:
    return [info.method, info.rank, info.params] if info is not None else ["-", 0, 0]


def run_generate(
    sd: SDXLAdapters, prompt: str, negative: str, seed: float, steps: float, guidance: float, width: float,
    height: float, selected: list[str], scale_table: Any, batched: bool, progress: Any = None,
    max_seconds: float = DEFAULT_REQUEST_SECONDS,
) -> tuple[list[tuple[Any, str]], list[list[Any]], str]:
    """Gallery items ``(image, adapter name)``, details rows and a status line; bad input -> status only.

    A request over ``max_seconds`` at this device's measured speed is rejected with the budget; a running one is
    stopped after ``TIMEOUT_FACTOR`` times it."""
    selected = list(selected or [])
    try:
        check_sdxl_request(prompt, steps, height, width, guidance, len(selected), negative_prompt=negative)
        not_loaded = [n for n in selected if n != BASE_LABEL and n not in sd.adapters]
        if not_loaded:
            raise ValueError(f"adapter(s) {not_loaded} are not loaded (see the adapters table for the reason); "
                             f"loaded: {list(sd.adapters)}")
        scales = _scales(scale_table, selected)
        if seed is None or not float(seed).is_integer() or not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be a whole number from 0 to 2^63-1, got {seed}")
        sd.check_budget(len(selected), steps, height, width, guidance, max_seconds)
    except (ValueError, TypeError, OverflowError) as err:  # TypeError: a non-number from the API
        return [], [], f"**Rejected:** {err}"
    callback = None
    if progress is not None:
        callback = lambda i, n: progress((i, n), desc="denoising")  # noqa: E731
    kwargs = dict(seed=int(seed), negative_prompt=negative or None, num_inference_steps=int(steps),
                  guidance_scale=float(guidance), height=int(height), width=int(width), scales=scales, callback=callback,
                  timeout=TIMEOUT_FACTOR * max_seconds)
    rows = _rows(selected)
    try:
        results = sd.generate_batch(prompt, rows, **kwargs) if batched else sd.generate_sequential(prompt, rows, **kwargs)
    except RequestTimeout as err:
        return [], [], f"**Stopped:** {err}"
    gallery = [(r.image, r.label) for r in results]
    details = [[r.label, *_info_cells(r.info), round(r.seconds, 3), "batched" if r.batched else "own run"] for r in results]
    total = sum(r.seconds for r in results)
    how = "one batched denoising loop" if batched else f"{len(results)} separate runs"
    return gallery, details, f"**Done:** {len(results)} image(s), seed {int(seed)}, {how}: {total:.2f} s in all"


def run_answer(
    llava: LlavaAdapters, image: Any, question: str, max_new_tokens: float, selected: list[str], scale_table: Any, batched: bool,
) -> tuple[list[list[Any]], str]:
    """Answer rows (adapter, answer, method, rank, params, seconds) and a status line."""
    selected = list(selected or [])
    try:
        check_llava_request(question, max_new_tokens, len(selected))
        scales = _scales(scale_table, selected)
    except (ValueError, TypeError, OverflowError) as err:  # TypeError: a non-number from the API
        return [], f"**Rejected:** {err}"
    rows = _rows(selected)
    if batched:
        answers = llava.answer_batch(image, question, rows, max_new_tokens=int(max_new_tokens), scales=scales)
    else:
        for name, scale in scales.items():
            llava.set_scale(name, scale)
        answers = [llava.answer(image, question, name, max_new_tokens=int(max_new_tokens)) for name in rows]
    table = [[a.label, a.text, *_info_cells(a.info), round(a.seconds, 3), "batched" if a.batched else "own run"] for a in answers]
    return table, f"**Done:** {len(answers)} answer(s){' (no image given: text only)' if image is None else ''}"


# -- UI ---------------------------------------------------------------------------------------------------
Models = Callable[[], "tuple[SDXLAdapters, LlavaAdapters | None, list[AdapterInfo]]"]


class BackgroundModels:
    """:func:`load_all` in a thread, started once the page serves (so the loading does not slow the start-up);
    calling the object waits for the models (and re-raises a loading error)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._started = threading.Event()
        self._future: Future | None = None

    def start(self) -> None:
        self._future = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-models").submit(load_all, self.args)
        self._started.set()

    def __call__(self) -> tuple[SDXLAdapters, LlavaAdapters | None, list[AdapterInfo]]:
        self._started.wait()
        return self._future.result()


def build_ui(models: Models, preview: list[AdapterInfo], size: int, llava_tab: bool = True,
             default_prompt: str = DEFAULT_PROMPT, max_seconds: float = DEFAULT_REQUEST_SECONDS) -> Any:
    """The page. It serves before the models are in: ``preview`` (adapter files read, nothing loaded) fills the
    lists; a request waits for ``models()``; each page load swaps in what actually loaded (incompatible adapters
    drop out of the lists and show their reason in the table) and says when the models are ready."""
    import gradio as gr

    def names_of(family: str, infos: list[AdapterInfo], loaded: Any = None) -> list[str]:
        return list(loaded.adapters) if loaded is not None else [i.name for i in infos if i.family == family and i.compatible]

    sdxl_names, llava_names = names_of("sdxl", preview), names_of("llava", preview)
    with gr.Blocks(title="mm-subspace · compare adapters") as demo:
        gr.Markdown("## mm-subspace · adapters side by side\nSame prompt, same seed, one image per adapter — "
                    "all selected adapters run in **one batched denoising loop** (each batch row routed to its own adapter).")
        banner = gr.Markdown("*Loading the models… the page works already; a request waits until they are in.*",
                             elem_id="banner")
        with gr.Tab("Text to image (SDXL)"):
            names = [BASE_LABEL] + sdxl_names
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", value=default_prompt, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", value="")
                    with gr.Row():
                        # no precision=0: Gradio's int() would turn a NaN from the API into its own generic error;
                        # run_generate checks whole numbers itself and answers "Rejected: ..."
                        seed = gr.Number(label="Seed", value=0, step=1, min_width=80)
                        steps = gr.Number(label="Steps", value=20, step=1, min_width=80)
                        guidance = gr.Number(label="Guidance", value=5.0, min_width=80)
                        width = gr.Number(label="Width", value=size, step=8, min_width=80)
                        height = gr.Number(label="Height", value=size, step=8, min_width=80)
                    adapters = gr.CheckboxGroup(names, value=names, label="Adapters (+ base)", elem_id="sdxl-adapters")
                    batched = gr.Checkbox(value=True, label="Batched: all adapters in one denoising loop")
                with gr.Column(scale=1):
                    scales = gr.Dataframe([[n, 1.0] for n in sdxl_names], headers=["adapter", "scale"],
                                          datatype=["str", "number"], type="array", interactive=True,
                                          label="Per-adapter scale", static_columns=[0])
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
            status = gr.Markdown(label="status", elem_id="sdxl-status")
            gallery = gr.Gallery(label="images", columns=max(2, min(len(names), 5)), height="auto",
                                 format="png", object_fit="contain", elem_id="gallery")
            details = gr.Dataframe(headers=DETAIL_HEADERS, label="details", interactive=False)

            def generate(prompt, negative_prompt, seed, num_inference_steps, guidance_scale, width, height, adapters,
                         scales, batched, progress=gr.Progress()):
                """One image per adapter (caption = adapter name), a row of details per image, and a status line."""
                return run_generate(models()[0], prompt, negative_prompt, seed, num_inference_steps, guidance_scale,
                                    width, height, adapters, scales, batched, progress, max_seconds)

            inputs = [prompt, negative, seed, steps, guidance, width, height, adapters, scales, batched]
            button.click(generate, inputs, [gallery, details, status], api_name="generate")
            prompt.submit(generate, inputs, [gallery, details, status], api_name=False)
        llava_lists = []
        if llava_tab:
            from mm_subspace.data.llava import digit_image, digits_split

            with gr.Tab("Visual instructions (LLaVA)"):
                lnames = [BASE_LABEL] + llava_names
                with gr.Row():  # a held-out digits scan: the shipped tiny LLaVA's domain
                    image = gr.Image(value=digit_image(digits_split()[1][0], size=128), type="pil", label="Image", height=240)
                    with gr.Column():
                        question = gr.Textbox(label="Question", value=DEFAULT_QUESTION)
                        max_tokens = gr.Number(label="Max new tokens", value=12, step=1)
                        ladapters = gr.CheckboxGroup(lnames, value=lnames, label="Adapters (+ base)")
                        lbatched = gr.Checkbox(value=True, label="Batched: all adapters in one generate call")
                        lscales = gr.Dataframe([[n, 1.0] for n in llava_names], headers=["adapter", "scale"],
                                               datatype=["str", "number"], type="array", interactive=True,
                                               label="Per-adapter scale", static_columns=[0])
                        ask = gr.Button("Ask", variant="primary", elem_id="ask")
                lstatus = gr.Markdown(label="status")
                answers = gr.Dataframe(headers=ANSWER_HEADERS, label="answers", interactive=False, wrap=True)

                def answer(image, question, max_new_tokens, adapters, scales, batched):
                    """One answer per adapter (a table row each) and a status line."""
                    return run_answer(models()[1], image, question, max_new_tokens, adapters, scales, batched)

                ask.click(answer, [image, question, max_tokens, ladapters, lscales, lbatched], [answers, lstatus], api_name="answer")
                llava_lists = [ladapters, lscales]
        with gr.Accordion("Adapters found (incompatible ones with the reason)", open=False):
            table = gr.Dataframe([info.row() for info in preview], headers=TABLE_HEADERS, interactive=False, wrap=True)

        def loaded() -> list[Any]:
            """What actually loaded: adapter lists, scale tables, the adapters table and the banner."""
            try:
                sd, llava, infos = models()
            except Exception as err:  # noqa: BLE001 - shown in the page instead of a blank error
                return [gr.update()] * (3 + len(llava_lists)) + [f"**The models failed to load:** {err}"]
            out = []
            for pipe in [sd, *([llava] if llava_lists else [])]:
                loaded_names = list(pipe.adapters)
                out += [gr.update(choices=[BASE_LABEL] + loaded_names, value=[BASE_LABEL] + loaded_names),
                        [[n, 1.0] for n in loaded_names]]
            ready = f"Ready: {len(sd.adapters)} SDXL adapter(s)" + (f", {len(llava.adapters)} LLaVA" if llava else "")
            return out + [[info.row() for info in infos], ready + "."]

        demo.load(loaded, None, [adapters, scales, *llava_lists, table, banner], api_name=False)
    return demo


def main(input_args: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(input_args)
    check_model_flags(args)  # a hub id that cannot be fetched: one error line at start-up, not a traceback
    preview, _ = adapters_to_serve(args)  # adapter files only: the page lists them while the models load
    models = BackgroundModels(args)
    demo = build_ui(models, preview, native_size(args.pretrained_model_name_or_path), not args.no_llava,
                    DEFAULT_PROMPT if args.pretrained_model_name_or_path is None else REAL_MODEL_PROMPT,
                    args.max_request_seconds)
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue).launch(
        server_name=args.server_name, server_port=args.server_port, share=args.share, footer_links=["api"],
        prevent_thread_lock=True,
    )
    models.start()  # the page serves already; requests wait for the models
    demo.block_thread()


if __name__ == "__main__":
    from mm_subspace.cli import report_errors

    raise SystemExit(report_errors("compare.py", main))
