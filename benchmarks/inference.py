"""Inference latency: merged adapter vs. the frozen base, unmerged vs. merged, batched multi-adapter vs. K runs.

1. No-grad forward of the LLaMA-shaped model (batch 4 x seq 256, a prefill) and of the tiny SDXL
   UNet, per method: the adapter unmerged, merged (``mms.merge``: the wrapper stays, adapters skipped)
   and merged-and-unloaded (a stock model again); PEFT LoRA unmerged/merged for reference. Goal:
   merged ≤ 1.01× the frozen base. Merged copies own their weights; all other cases share the base's.
2. Batched multi-adapter generation vs. K sequential runs (``pipelines/sdxl.py``, ``pipelines/llava.py``)
   is measured by ``benchmarks/batched_generation.py``; its results are in ``results/batched_generation.md``.

Every group is timed interleaved in one process (median of ``--repeats`` after warm-up).

    python benchmarks/inference.py [--layers 4 --hidden 1024 --seq 256 --batch 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import _common as C
import torch
from torch import nn

import mm_subspace as mms


def forward_fn(model: nn.Module, run: Callable[[nn.Module], Any]) -> Callable[[], None]:
    model.eval()

    def fn() -> None:
        with torch.inference_mode():
            run(model)

    return fn


def variants(base: nn.Module, targets: list[str], entry: str) -> dict[str, tuple[str, str, nn.Module]]:
    """label -> (method, mode, model) for frozen / unmerged / merged / merge_and_unload (+ PEFT)."""
    out: dict[str, tuple[str, str, nn.Module]] = {"frozen base": ("-", "base", base)}
    for case in C.method_cases(include_frozen=False, verbose=False):
        torch.manual_seed(C.SEED)
        if case.method == "peft":
            from peft import LoraConfig, get_peft_model

            lora = dict(r=C.RANK, lora_alpha=C.ALPHA, target_modules=targets, init_lora_weights=False)
            out["PEFT LoRA unmerged"] = ("PEFT LoRA", "unmerged", get_peft_model(C.share_weights_copy(base), LoraConfig(**lora)))
            merged = get_peft_model(copy.deepcopy(base), LoraConfig(**lora))
            merged.merge_adapter()
            out["PEFT LoRA merged"] = ("PEFT LoRA", "merged", merged)
            continue
        config = mms.config_for(case.method, rank=C.RANK, alpha=C.ALPHA, targets=targets, init_weights=False, **case.kwargs)
        out[f"{case.label} unmerged"] = (case.label, "unmerged", mms.inject(C.share_weights_copy(base), config))
        if not mms.get_method(case.method).mergeable:
            continue
        merged = mms.inject(copy.deepcopy(base), config)
        mms.merge(merged)
        out[f"{case.label} merged"] = (case.label, "merged", merged)
        if case.method == "lora":
            out[f"{case.label} merge_and_unload"] = (case.label, "merge_and_unload",
                                                     mms.merge_and_unload(mms.inject(copy.deepcopy(base), config)))
    return out


def bench_forward(title: str, base: nn.Module, targets: list[str], entry: str, run: Callable[[nn.Module], Any],
                  repeats: int) -> list[dict[str, Any]]:
    print(f"\n## {title}")
    models = variants(base, targets, entry)
    times = C.interleaved({k: forward_fn(m, run) for k, (_, _, m) in models.items()}, repeats=repeats, warmup=1)
    med = {k: C.median(v) for k, v in times.items()}
    rows = []
    for label, (method, mode, _) in models.items():
        merged = med.get(f"{method} merged")
        rows.append({"model": title, "case": label, "method": method, "mode": mode, "median_s": med[label],
                     "vs_frozen": med[label] / med["frozen base"],
                     "unmerged_vs_merged": med[label] / merged if mode == "unmerged" and merged else None,
                     "times_s": times[label]})
    for r in rows:
        extra = f"  unmerged/merged {r['unmerged_vs_merged']:.3f}" if r["unmerged_vs_merged"] else ""
        print(f"  {r['case']:28s} {1000 * r['median_s']:8.1f} ms  x frozen {r['vs_frozen']:.3f}{extra}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p, repeats=7)
    args = p.parse_args(argv)
    threads = C.set_threads(args.threads)
    shape = C.shape_of(args)
    batch = C.llama_batch(shape)["input_ids"]
    rows = bench_forward("LLaMA-shaped", C.llama_model(shape), C.LLAMA_TARGETS, C.LLAMA_ENTRY,
                         lambda m: m(input_ids=batch), args.repeats)
    if not args.skip_unet:
        unet = C.tiny_unet()
        inputs = C.unet_batch(unet)
        rows += bench_forward("tiny SDXL UNet", unet, C.UNET_TARGETS, C.UNET_ENTRY, lambda m: m(**inputs), args.repeats)

    table = C.markdown_table(
        ["model", "case", "median (ms)", "× frozen base", "unmerged / merged"],
        [[r["model"], r["case"], f"{1000 * r['median_s']:.1f}", r["vs_frozen"],
          r["unmerged_vs_merged"] if r["unmerged_vs_merged"] is not None else "-"] for r in rows],
    )
    md = (f"No-grad forward latency, r={C.RANK}, median of {args.repeats} interleaved runs, {threads} threads. "
          f"LLaMA-shaped: {shape.describe()} (a prefill). Tiny SDXL UNet: batch 4 of 32x32 latents.\n\n{table}\n")
    md += ("\nBatched multi-adapter generation vs. K sequential runs: see `batched_generation.py` and "
           "`results/batched_generation.md`.\n")
    payload = {"shape": vars(shape), "rows": rows}
    C.write_results("inference", payload, md)
    return payload


if __name__ == "__main__":
    main()
