"""Evaluation and reporting of the visual-instruction script (``training/visual_instruction.py``): greedy answers
scored per task (exact match), the results table, and the model card with a usage snippet that runs as written."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

import mm_subspace
from mm_subspace.atomic import atomic_write_text
from mm_subspace.data import llava as data
from mm_subspace.errors import DataError
from mm_subspace.inject import routing
from mm_subspace.training_utils import LossHistory, adapter_summary, write_model_card

logger = logging.getLogger("visual_instruction")


def generation_routing(model: Any, route_mask: torch.Tensor, cache: bool = True) -> contextlib.AbstractContextManager:
    """:func:`routing` (route on the prompt, cache for the decode steps) when the model has adapters."""
    from mm_subspace.inject import get_state

    if get_state(model, required=False) is None:
        return contextlib.nullcontext()
    return routing(model, route_mask, cache=cache)


def evaluate(model: Any, encoder: data.ConversationEncoder, records: list[data.Record], batch_size: int,
             max_new_tokens: int, pixels: Any, desc: str = "eval") -> dict[str, Any]:
    """Greedy answers to every record's last question; exact match per task, the mean over tasks.

    Prompts are grouped by length (no padding within a ``generate`` call). Returns
    ``{"tasks": {task: {"accuracy", "n"}}, "mean_accuracy", "n", "examples": [...]}``.
    """
    from tqdm.auto import tqdm

    tok = encoder.tokenizer
    prompts = []
    for rec in records:
        if not rec.messages or rec.messages[-1]["role"] != "assistant":
            raise DataError(f"record {rec.id!r}: evaluation needs a last gpt turn (the reference answer)")
        ids = encoder.prompt_ids(rec.messages[:-1])
        prompts.append((len(ids), ids, rec))
    groups: dict[tuple[int, bool], list[tuple[list[int], data.Record]]] = {}
    for n, ids, rec in prompts:
        groups.setdefault((n, rec.image is not None), []).append((ids, rec))
    chunks = [(key, items[i:i + batch_size]) for key, items in groups.items() for i in range(0, len(items), batch_size)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict[str, list[bool]] = {}
    examples = []
    with torch.no_grad():
        for (_, has_image), chunk in tqdm(chunks, desc=desc, disable=len(chunks) < 4):
            ids = torch.tensor([c[0] for c in chunk], device=device)
            mask = torch.ones_like(ids)
            kwargs = dict(input_ids=ids, attention_mask=mask)
            if has_image:
                kwargs["pixel_values"] = pixels([c[1].image for c in chunk]).to(device)
            with generation_routing(model, mask):
                out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tok.pad_token_id, eos_token_id=encoder.stop_token_ids)
            texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for (_, rec), text in zip(chunk, texts):
                reference = rec.messages[-1]["content"]
                task = str(rec.meta.get("task", "all"))
                ok = data.exact_match(text, reference)
                results.setdefault(task, []).append(ok)
                if len(examples) < 200:
                    examples.append({"id": rec.id, "task": task, "answer": text.strip(), "reference": reference, "correct": ok})
    model.train(was_training)
    tasks = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(results.items())}
    mean = sum(t["accuracy"] for t in tasks.values()) / max(1, len(tasks))
    return {"tasks": tasks, "mean_accuracy": mean, "n": sum(len(v) for v in results.values()), "examples": examples}


def eval_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per task, one column per evaluated model (e.g. base, adapter)."""
    names = list(results)
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task in tasks:
        cells = [f"{results[n]['tasks'][task]['accuracy']:.1%}" if task in results[n]["tasks"] else "–" for n in names]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{results[n]['mean_accuracy']:.1%}**" for n in names) + " |")
    n = next(iter(results.values()))["n"]
    lines.append(f"\nExact match of greedy answers (lower-cased, trailing period dropped) on {n} held-out prompts.")
    return "\n".join(lines)


def load_records(args: argparse.Namespace, split: str = "test") -> list[data.Record | DataError]:
    """The evaluation records the flags name, images decoded (training reads lazily: :func:`training_set`)."""
    if split != "test":
        raise ValueError(f"load_records reads the evaluation records (split 'test'), not {split!r}; see training_set")
    if args.eval_data_path is not None:
        records = data.load_llava_json(args.eval_data_path, args.image_folder, allow_outside=args.allow_outside_data)
    elif args.data_path is None:
        records = list(data.digits_instruction_records("test", args.tasks, limit=args.eval_limit))
    else:
        return []
    return records[: args.eval_limit] if args.eval_limit and args.eval_data_path else records


def run_eval(args: argparse.Namespace, model: Any, encoder: data.ConversationEncoder, pixels: Any,
             with_adapter: bool, write: bool = True) -> dict[str, dict[str, Any]]:
    """Evaluate the adapter (and with ``--eval_base`` the base); write ``<output_dir>/eval.json`` (``write``: rank 0
    when every rank evaluates a sharded model)."""
    raw = load_records(args, "test")
    if not raw:
        logger.info("no evaluation data (--eval_data_path) given: skipping evaluation")
        return {}
    bad = [r for r in raw if isinstance(r, DataError)]
    if bad and not args.skip_bad_records:
        raise DataError(f"{len(bad)} bad evaluation record(s); fix them or pass --skip_bad_records:\n  " +
                        "\n  ".join(map(str, bad[:5])))
    records = [r for r in raw if not isinstance(r, DataError)]
    out: dict[str, dict[str, Any]] = {}
    if args.eval_base or not with_adapter:
        ctx = mm_subspace.disable_adapters(model) if with_adapter else contextlib.nullcontext()
        with ctx:
            out["base"] = evaluate(model, encoder, records, args.eval_batch_size, args.max_new_tokens, pixels, "eval base")
    if with_adapter:
        out[args.adapter] = evaluate(model, encoder, records, args.eval_batch_size, args.max_new_tokens, pixels,
                                     f"eval {args.adapter}")
    for name, res in out.items():
        logger.info("eval %s: mean exact match %.4f  %s", name, res["mean_accuracy"],
                    {t: round(v["accuracy"], 4) for t, v in res["tasks"].items()})
    if write:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output_dir) / "eval.json", json.dumps(out, indent=2) + "\n")
    return out




def _append_eval_to_card(card: Path, results: dict[str, Any]) -> None:
    if not results:
        return
    text = card.read_text(encoding="utf-8")
    marker = "## Evaluation (--eval_only)"
    text = text.split(marker)[0].rstrip() + f"\n\n{marker}\n\n{eval_table(results)}\n"
    atomic_write_text(card, text)


def usage_snippet(args: argparse.Namespace, output_dir: Path) -> str:
    """The card's "Use it" code: runs as written from the folder above the run's (relative paths, no local absolute
    path), with an image and a question defined: a digits scan and a digits question for the embedded data, a
    photo and a question of the user's own kind otherwise."""
    model = args.model_name_or_path
    if model is None:
        load = "llava = LlavaAdapters.from_pretrained()  # the embedded tiny LLaVA this adapter was trained on\n"
    elif os.path.isabs(model) or os.path.exists(model):
        load = (f'llava = LlavaAdapters.from_pretrained("{Path(model).name}")  # your copy of the base model '
                "(a local folder when trained)\n")
    else:
        load = f'llava = LlavaAdapters.from_pretrained("{model}")\n'
    if args.data_path is None:
        inputs = ("from mm_subspace.data.llava import digit_image\n\n", "image = digit_image(7)  # a digits scan\n",
                  'question = "is the digit even? answer yes or no."\n')
    else:
        inputs = ("from PIL import Image\n\n", 'image = Image.open("photo.jpg").convert("RGB")  # an image like your data\'s\n',
                  'question = "Describe the image."  # a question like those of your data\n')
    return (f"```python\n{inputs[0]}from mm_subspace.pipelines.llava import LlavaAdapters\n\n{load}"
            f'llava.load_adapter("{output_dir.name}", name="{args.adapter}")  # this run\'s folder\n'
            f"{inputs[1]}{inputs[2]}"
            f'print(llava.answer(image, question, adapter="{args.adapter}").text)\n```')


def _model_card(args: argparse.Namespace, output_dir: Path, history: LossHistory, steps: int, total_batch: int,
                world: int, peft_note: str, curve: Path, model: Any, results: dict[str, Any], trainable: int,
                sec_per_step: float, base_name: str) -> None:
    loss = history.last("loss")
    summary = {
        "base model": base_name,
        "data": args.data_path or "digits instruction tasks (mm_subspace.data.llava.digits_instruction_records)",
        "steps": steps,
        "batch (per process × processes × accumulation)": f"{args.train_batch_size} × {world} × "
                                                          f"{args.gradient_accumulation_steps} = {total_batch}",
        "final loss": f"{loss:.5f}" if loss is not None else "n/a (no step run)",
        "final aux loss": f"{history.last('aux_loss'):.5g}" if history.rows else "n/a",
        "trainable parameters": f"{trainable:,d}",
        "median s/step": f"{sec_per_step:.3f}",
        "projector": args.tune_projector,
        "4-bit": "NF4 + double quant (LM only)" if args.load_in_4bit else "no",
        "recipe": args.recipe or "none",
        "PEFT export": peft_note,
        **{f"adapter on {k}": v for k, v in adapter_summary({"model": model}).items()},
    }
    sections = {}
    if results:
        sections["Evaluation"] = eval_table(results)
    sections["Use it"] = usage_snippet(args, output_dir) + (
        "\n\nMerged into a full model: `mm_subspace.pipelines.llava.save_merged_llava(base, adapter_dir, out)` or "
        "`--save_merged`."
    )
    write_model_card(output_dir, title=f"Visual-instruction tuning — {args.adapter}", base_model=base_name,
                     method=args.adapter, summary=summary,
                     flags={k: v for k, v in vars(args).items() if k not in ("embedded_model", "embedded_data", "default_notes")},
                     images={"Loss curve": curve.relative_to(output_dir).as_posix()}, sections=sections,
                     tags=("llava", "visual-instruction-tuning"))
