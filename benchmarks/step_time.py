"""Training step time (forward + backward + AdamW) per method, as ratios to PEFT LoRA and the frozen base.

Models: a LLaMA-shaped decoder (default 4 layers, hidden 1024, batch 4 x seq 256, r=16 on
q,k,v,up,down) and the tiny SDXL UNet (r=16 capped by layer size, on to_q,k,v,out.0). All cases share
one copy of the base weights and run interleaved in one process; each number is the median of
``--repeats`` steps after ``--warmup`` rounds. Goals (issue 8): lora ≤ 1.00× PEFT LoRA,
moslora ≤ 1.05×, sulora (N=2r) ≤ 1.15×.

    python benchmarks/step_time.py [--layers 4 --hidden 1024 --seq 256 --batch 4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import _common as C
import torch


def bench_model(title: str, base: torch.nn.Module, targets: list[str], entry: str, loss_fn: Callable, batch: Any,
                repeats: int, warmup: int) -> list[dict[str, Any]]:
    print(f"\n## {title}")
    cases = C.method_cases()
    steps, params = {}, {}
    for case in cases:
        model = C.adapt(base, case, targets, entry)
        params[case.label] = sum(p.numel() for p in C.trainable(model))
        steps[case.label] = C.train_step_fn(model, loss_fn, batch)
    times = C.interleaved(steps, repeats=repeats, warmup=warmup)
    med = {k: C.median(v) for k, v in times.items()}
    floor, peft = med.get("frozen base"), med.get("PEFT LoRA")
    rows = []
    for case in cases:
        m = med[case.label]
        rows.append({
            "model": title, "case": case.label, "trainable": params[case.label], "median_s": m,
            "min_s": min(times[case.label]), "max_s": max(times[case.label]),
            "vs_peft_lora": m / peft if peft else None, "vs_frozen": m / floor if floor else None,
            "times_s": times[case.label], "note": case.note,
        })
    print(markdown(rows, ""))
    return rows


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    table = C.markdown_table(
        ["model", "case", "trainable params", "median step (ms)", "min-max (ms)", "× PEFT LoRA", "× frozen base"],
        [[r["model"], r["case"], r["trainable"], f"{1000 * r['median_s']:.1f}",
          f"{1000 * r['min_s']:.0f}-{1000 * r['max_s']:.0f}",
          r["vs_peft_lora"] if r["vs_peft_lora"] is not None else "-",
          r["vs_frozen"] if r["vs_frozen"] is not None else "-"] for r in rows],
    )
    return f"{header}\n\n{table}\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--name", default="step_time", help="results file name (results/<name>.json/.md)")
    args = p.parse_args(argv)
    threads = C.set_threads(args.threads)
    shape = C.shape_of(args)
    rows: list[dict[str, Any]] = []
    if not args.skip_llama:
        rows += bench_model("LLaMA-shaped", C.llama_model(shape), C.LLAMA_TARGETS, C.LLAMA_ENTRY, C.llama_loss,
                            C.llama_batch(shape), args.repeats, args.warmup)
    if not args.skip_unet:
        unet = C.tiny_unet()
        rows += bench_model("tiny SDXL UNet", unet, C.UNET_TARGETS, C.UNET_ENTRY, C.unet_loss,
                            C.unet_batch(unet), args.repeats, args.warmup)
    header = (f"Step time (forward + backward + AdamW), r={C.RANK}, alpha={C.ALPHA:g}; median of {args.repeats} "
              f"interleaved steps after {args.warmup} warm-up round(s); {threads} threads. "
              f"LLaMA-shaped: {shape.describe()}. Tiny SDXL UNet: batch 4 of 32x32 latents, 77 text tokens.")
    C.write_results(args.name, {"shape": vars(shape), "args": vars(args), "rows": rows}, markdown(rows, header))
    return rows


if __name__ == "__main__":
    main()
