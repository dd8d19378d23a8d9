"""Peak training memory and trainable parameters per method, and 4-bit vs. float16 base weight memory.

Peak memory on CPU is the process's resident-set high-water mark (``VmHWM``), so every case runs in a
fresh subprocess: build the base model, reset the mark (``/proc/self/clear_refs``), record the RSS,
then inject the adapter and take ``--steps`` training steps (forward + backward + AdamW); the
reported number is ``VmHWM − RSS`` = what training adds on top of the loaded base (activations,
gradients, optimizer state, adapter weights). 4-bit: the LLaMA-shaped model's linear layers
quantised with bitsandbytes NF4 + double quantisation (QLoRA), packed data + statistics, against
the same weights in float16 (goal ≤ 0.35×).

    python benchmarks/memory.py [--layers 4 --hidden 1024 --seq 256 --batch 4] [--steps 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import _common as C
import torch


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Subprocess mode: measure one case, print one JSON line."""
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (imported before the baseline in every case, so its import is not counted)

    case = next(c for c in C.method_cases(verbose=False) if c.label == args.case)
    if args.model == "llama":
        shape = C.shape_of(args)
        base, batch = C.llama_model(shape), C.llama_batch(shape)
        targets, entry, loss_fn = C.LLAMA_TARGETS, C.LLAMA_ENTRY, C.llama_loss
    else:
        base = C.tiny_unet()
        batch, targets, entry, loss_fn = C.unet_batch(base), C.UNET_TARGETS, C.UNET_ENTRY, C.unet_loss
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _status("VmRSS")
    model = C.adapt(base, case, targets, entry)
    step = C.train_step_fn(model, loss_fn, batch)
    for _ in range(args.steps):
        step()
    print(json.dumps({"case": case.label, "trainable": sum(p.numel() for p in C.trainable(model)),
                      "base_rss": start, "peak_extra": _status("VmHWM") - start}))


def measure(model: str, case: C.Case, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--case", case.label, "--steps", str(args.steps),
           "--threads", str(args.threads), "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--seq", str(args.seq), "--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(out.stderr[-2000:])
        raise RuntimeError(f"memory child for {model}/{case.label} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def four_bit(shape: C.LlamaShape) -> dict[str, Any]:
    from mm_subspace.quant import quantize_model_4bit, weight_memory

    model = C.llama_model(shape, dtype=torch.float16)
    quantize_model_4bit(model, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
    mem = weight_memory(model)
    return {**mem, "ratio": mem["quantized"] / mem["float16"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(p, repeats=None)
    p.add_argument("--steps", type=int, default=2, help="training steps per case (the optimizer state appears at step 1)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="llama", help=argparse.SUPPRESS)
    p.add_argument("--case", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    args.threads = C.set_threads(args.threads)
    shape = C.shape_of(args)
    cases = C.method_cases()
    rows = []
    models = [("llama", shape.describe())] + ([] if args.skip_unet else [("unet", "tiny SDXL UNet, batch 4")])
    for model, title in models:
        print(f"\n## {title}")
        results = {case.label: measure(model, case, args) for case in cases}
        floor = results["frozen base"]["peak_extra"]
        peft = results.get("PEFT LoRA", {}).get("peak_extra")
        for case in cases:
            r = results[case.label]
            rows.append({"model": "LLaMA-shaped" if model == "llama" else "tiny SDXL UNet", "case": case.label,
                         "trainable": r["trainable"], "base_rss_mb": r["base_rss"] / 2**20,
                         "peak_extra_mb": r["peak_extra"] / 2**20, "vs_frozen": r["peak_extra"] / floor,
                         "vs_peft_lora": r["peak_extra"] / peft if peft else None})
            print(f"  {case.label:16s} trainable {r['trainable']:>10,d}  peak +{r['peak_extra'] / 2**20:8.1f} MB")
    quant = four_bit(shape)
    table = C.markdown_table(
        ["model", "case", "trainable params", "base RSS (MB)", "peak extra (MB)", "× PEFT LoRA", "× frozen base"],
        [[r["model"], r["case"], r["trainable"], f"{r['base_rss_mb']:.0f}", f"{r['peak_extra_mb']:.1f}",
          r["vs_peft_lora"] if r["vs_peft_lora"] is not None else "-", r["vs_frozen"]] for r in rows],
    )
    md = (f"Peak training memory over the loaded base (RSS high-water mark, fresh process per case, "
          f"{args.steps} steps, r={C.RANK}); LLaMA: {shape.describe()}.\n\n{table}\n\n"
          f"4-bit base weights (NF4 + double quantisation, packed data + statistics) vs float16, linear layers "
          f"of the LLaMA-shaped model: {quant['quantized'] / 2**20:.1f} MB vs {quant['float16'] / 2**20:.1f} MB = "
          f"**{quant['ratio']:.3f}×** (goal ≤ 0.35×).\n")
    payload = {"shape": vars(shape), "rows": rows, "four_bit": quant}
    C.write_results("memory", payload, md)
    return payload


if __name__ == "__main__":
    main()
