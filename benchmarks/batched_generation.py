"""Batched multi-adapter generation: per-layer routing cost, and batched vs. K sequential runs vs. one adapter.

Routing (per adapted layer): one ``nn.Linear`` with K adapters (lora, moslora, ts_mixing, asylora, rank
4), a batch of 2K rows (classifier-free guidance doubles it) routed one adapter per row with
``forward_context(adapter_rows=...)`` at K = 1, 2, 4, 8: aten ops per call (counted with a
``TorchDispatchMode``) and host time per call, for the stacked path (one gather + batched matmul,
factors cached), the same re-stacking the factors every call, and the per-adapter loop
(``AdapterLayer.stacked_routing = False``). The tensors are tiny (``--routing_dim``, ``--routing_tokens``)
so the time is the per-call dispatch cost a GPU's host thread pays. Then the same on the tiny SDXL UNet
(one UNet call, batch 2K), stacked vs. loop.

Pipelines: SDXL ``SDXLAdapters.generate_batch(prompt, K adapters)`` — one denoising loop whose batch rows
are routed to their own adapter — against K separate ``generate`` calls and against one ``generate``
call with one adapter (the issue's goal: K=4 at ≤ 1.3× one adapter's time). LLaVA: the same for
``answer_batch`` / ``answer``. The adapters (lora, moslora, ts_mixing, sulora when registered) are
saved with random non-zero factors and loaded from disk as the app does. Cases run interleaved in
one process; each number is the median of ``--repeats``.

    python benchmarks/batched_generation.py [--parts routing,pipelines] [--k 4] [--steps 4] [--size 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

METHODS = ("lora", "moslora", "ts_mixing", "sulora", "dora", "asylora")
#: the routing benchmark's adapters: all stackable (one batched matmul per layer)
STACKED_METHODS = ("lora", "moslora", "ts_mixing", "asylora")
ROUTING_KS = (1, 2, 4, 8)
PARTS = ("routing", "pipelines")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="number of adapters rendered side by side")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--size", type=int, default=64, help="image height = width (tiny default: 64)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="LLaVA answer length (greedy)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--routing_dim", type=int, default=64, help="in = out features of the routing layer")
    parser.add_argument("--routing_tokens", type=int, default=4, help="tokens per row in the routing layer benchmark")
    parser.add_argument("--routing_calls", type=int, default=20, help="layer calls per timed repeat")
    parser.add_argument("--routing_repeats", type=int, default=151, help="timed repeats per routing case (median)")
    args = parser.parse_args()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    return args


# -- routing cost per layer -----------------------------------------------------------------------------
class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (views included: each is a host-side call)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> int:
    with OpCount() as counter:
        fn()
    return counter.count


def add_adapters(model: nn.Module, k: int, targets: list[str]) -> list[str]:
    """Inject ``k`` stackable adapters (rank 4, random non-zero factors) into ``model``; returns their names."""
    import mm_subspace as mms

    names = []
    for i in range(k):
        method = STACKED_METHODS[i % len(STACKED_METHODS)]
        torch.manual_seed(C.SEED + i)
        mms.inject(model, mms.config_for(method, rank=4, alpha=4, targets=targets, init_weights=False), f"{method}-{i}")
        names.append(f"{method}-{i}")
    return names


def routing_modes(model: nn.Module, call: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
    """The three ways to route: stacked (cached factors), stacked re-stacked every call, the per-adapter loop."""
    from mm_subspace.inject import adapter_layers
    from mm_subspace.layer import AdapterLayer

    layers = [layer for _, layer in adapter_layers(model)]

    def stacked() -> Any:
        AdapterLayer.stacked_routing = True
        return call()

    def restacked() -> Any:
        AdapterLayer.stacked_routing = True
        for layer in layers:
            layer.clear_routing_cache()
        return call()

    def loop() -> Any:
        AdapterLayer.stacked_routing = False
        return call()

    return {"stacked": stacked, "stacked, re-stacked every call": restacked, "loop": loop}


def bench_routing_layer(args: argparse.Namespace) -> list[dict[str, Any]]:
    import mm_subspace as mms

    dim, rows = args.routing_dim, []
    for k in ROUTING_KS:
        torch.manual_seed(C.SEED)
        model = nn.Sequential(nn.Linear(dim, dim)).eval()
        names = add_adapters(model, k, ["0"])
        layer, x = model[0], torch.randn(2 * k, args.routing_tokens, dim)

        def once(layer: nn.Module = layer, x: torch.Tensor = x) -> None:
            layer(x)

        def calls(n: int = args.routing_calls) -> None:
            for _ in range(n):
                once()

        with torch.no_grad(), mms.forward_context(model, adapter_rows=names):
            modes = routing_modes(model, once)
            ops = {name: (fn(), count_ops(fn))[1] for name, fn in modes.items()}  # after one call that fills the caches
            timed = routing_modes(model, calls)
            times = C.interleaved(timed if k > 1 else {"stacked": timed["stacked"]}, args.routing_repeats, warmup=1,
                                  clock=time.thread_time)
        for name, seconds in times.items():
            label = name if k > 1 else "one adapter (no gather)"
            rows.append({"k": k, "mode": label, "ops": ops[name], "host_us": 1e6 * C.median(seconds) / args.routing_calls,
                         "best_us": 1e6 * min(seconds) / args.routing_calls, "times_s": seconds})
    for row in rows:
        row["vs_k1"] = row["host_us"] / rows[0]["host_us"]
        row["best_vs_k1"] = row["best_us"] / rows[0]["best_us"]
    return rows


def bench_routing_unet(args: argparse.Namespace) -> list[dict[str, Any]]:
    import mm_subspace as mms
    from mm_subspace.inject import adapter_layers

    unet = C.tiny_unet()
    names = add_adapters(unet, max(ROUTING_KS), C.UNET_TARGETS)
    n_layers = sum(1 for _ in adapter_layers(unet))
    rows = []
    for k in ROUTING_KS:
        batch = C.unet_batch(unet, 2 * k)
        with torch.no_grad(), mms.forward_context(unet, adapter_rows=names[:k]):
            modes = routing_modes(unet, lambda batch=batch: unet(**batch))
            modes = {name: modes[name] for name in ("stacked", "loop")}
            ops = {name: (fn(), count_ops(fn))[1] for name, fn in modes.items()}
            times = C.interleaved(modes, args.repeats, warmup=1, clock=time.thread_time)
        for name, seconds in times.items():
            rows.append({"k": k, "mode": name, "ops": ops[name], "adapted_layers": n_layers, "median_s": C.median(seconds),
                         "times_s": seconds})
    for row in rows:
        loop = next(r for r in rows if r["k"] == row["k"] and r["mode"] == "loop")
        row["vs_loop"] = row["median_s"] / loop["median_s"]
    return rows


def routing_markdown(layer_rows: list[dict[str, Any]], unet_rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    layer_table = C.markdown_table(
        ["K", "routing", "aten ops per call", "host time per call, median (µs)", "× K=1", "best of repeats (µs)", "× K=1 (best)"],
        [[r["k"], r["mode"], r["ops"], f"{r['host_us']:.0f}", f"{r['vs_k1']:.2f}", f"{r['best_us']:.0f}",
          f"{r['best_vs_k1']:.2f}"] for r in layer_rows],
    )
    unet_table = C.markdown_table(
        ["K", "routing", "aten ops per UNet call", "÷ adapted layers", "CPU time (ms)", "× loop"],
        [[r["k"], r["mode"], r["ops"], f"{r['ops'] / r['adapted_layers']:.1f}", f"{1000 * r['median_s']:.0f}",
          f"{r['vs_loop']:.2f}"] for r in unet_rows],
    )
    k4 = next(r for r in layer_rows if r["k"] == 4 and r["mode"] == "stacked")
    verdict = {(True, True): "met", (False, False): "missed"}.get(
        (k4["vs_k1"] <= 1.5, k4["best_vs_k1"] <= 1.5), "met on the best time, missed on the median" if k4["best_vs_k1"] <= 1.5
        else "met on the median, missed on the best time")
    return (
        f"### Routing cost per adapted layer (K adapters, one per row)\n\n"
        f"One `nn.Linear({args.routing_dim}, {args.routing_dim})` with K adapters ({', '.join(STACKED_METHODS)} in turn, "
        f"rank 4), batch 2K x {args.routing_tokens} tokens, under `torch.no_grad()`; ops and time include the base "
        f"layer. Median over {args.routing_repeats} interleaved repeats of {args.routing_calls} calls. K=1 is the "
        "single-adapter forward (every row has the same owner, no gather). Host time is the CPU time of the calling "
        "thread (`time.thread_time`, one torch thread), so time other jobs hold the CPU is not counted.\n\n"
        f"{layer_table}\n\n"
        f"Goal: K=4 ≤ 1.5x the host time of K=1 per layer: **{verdict}** (stacked K=4: {k4['vs_k1']:.2f}x the median, "
        f"{k4['best_vs_k1']:.2f}x the best time).\n\n"
        f"Tiny SDXL UNet, {unet_rows[0]['adapted_layers']} adapted layers (to_q, to_k, to_v, to_out.0), one UNet call "
        f"at batch 2K, CPU time of the calling thread, median of {args.repeats}:\n\n{unet_table}\n"
    )


def methods(k: int) -> list[str]:
    import mm_subspace as mms

    available = [m for m in METHODS if m in mms.list_methods()]
    return [available[i % len(available)] for i in range(k)]


def summarise(label: str, times: dict[str, list[float]], k: int) -> list[dict[str, Any]]:
    med = {name: C.median(v) for name, v in times.items()}
    one = med["one adapter"]
    rows = []
    for name, seconds in med.items():
        rows.append({"pipeline": label, "case": name, "median_s": seconds, "vs_one_adapter": seconds / one,
                     "vs_sequential": seconds / med[f"{k} sequential runs"], "per_image_s": seconds / (1 if name == "one adapter" else k),
                     "times_s": times[name]})
    return rows


def bench_sdxl(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from mm_subspace.pipelines import SDXLAdapters
    from mm_subspace.training.demo_adapters import make_demo_sdxl_adapter

    sd = SDXLAdapters.from_pretrained()
    names = []
    for i, method in enumerate(methods(args.k)):
        name = f"{method}-{i}"
        make_demo_sdxl_adapter(sd, root / name, method, rank=4, steps=0, seed=i, init_weights=False)
        names.append(sd.load_adapter(root / name, name=name).name)
    kw = dict(seed=0, num_inference_steps=args.steps, height=args.size, width=args.size)
    prompt = "a photo of sks cat"
    cases = {
        "one adapter": lambda: sd.generate(prompt, names[0], **kw),
        f"{args.k} sequential runs": lambda: sd.generate_sequential(prompt, names, **kw),
        f"{args.k} batched (one loop)": lambda: sd.generate_batch(prompt, names, **kw),
    }
    timings = C.interleaved(cases, args.repeats, args.warmup)
    return summarise(f"SDXL tiny, {args.size}x{args.size}, {args.steps} steps, CFG", timings, args.k)


def bench_llava(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from mm_subspace.pipelines import LlavaAdapters
    from mm_subspace.tiny_models import sample_photo
    from mm_subspace.training.demo_adapters import make_demo_llava_adapter

    llava = LlavaAdapters.from_pretrained()
    names = []
    for i, method in enumerate(methods(args.k)):
        name = f"{method}-{i}"
        make_demo_llava_adapter(llava, root / f"llava-{name}", method, rank=4, steps=0, seed=i, init_weights=False)
        names.append(llava.load_adapter(root / f"llava-{name}", name=name).name)
    image, question, n = sample_photo("chelsea", size=64), "what animal is in the photo?", args.max_new_tokens
    cases = {
        "one adapter": lambda: llava.answer(image, question, names[0], max_new_tokens=n),
        f"{args.k} sequential runs": lambda: [llava.answer(image, question, m, max_new_tokens=n) for m in names],
        f"{args.k} batched (one loop)": lambda: llava.answer_batch(image, question, names, max_new_tokens=n),
    }
    return summarise(f"LLaVA tiny, greedy {n} new tokens", C.interleaved(cases, args.repeats, args.warmup), args.k)


def pipelines_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    table = C.markdown_table(
        ["pipeline", "case", "median (ms)", "per image (ms)", "× one adapter", "× sequential"],
        [[r["pipeline"], r["case"], f"{1000 * r['median_s']:.0f}", f"{1000 * r['per_image_s']:.0f}",
          f"{r['vs_one_adapter']:.2f}", f"{r['vs_sequential']:.2f}"] for r in rows],
    )
    return (
        f"### Pipelines, K={args.k}\n\n"
        f"Adapters: {', '.join(methods(args.k))} (rank 4, random non-zero factors, loaded from disk). "
        f"Median of {args.repeats} interleaved repeats after {args.warmup} warm-up round(s).\n\n{table}\n\n"
        "Goal of the issue: K=4 batched ≤ 1.3× one adapter. On a CPU the tiny UNet's convolutions and "
        "attention cost grows linearly with the batch, so batching saves the per-call overhead "
        "(Python dispatch, scheduler, VAE call, text encoders) but cannot hide the K× arithmetic; "
        "the ratio to one adapter approaches 1 only where the hardware has idle parallel width (a GPU).\n"
    )


def main() -> None:
    args = parse_args()
    C.set_threads(args.threads)
    payload: dict[str, Any] = {"args": vars(args)}
    sections = []
    if "routing" in args.parts:
        from mm_subspace.layer import AdapterLayer

        try:
            payload["routing_layer"] = bench_routing_layer(args)
            payload["routing_unet"] = bench_routing_unet(args)
        finally:
            AdapterLayer.stacked_routing = True  # the loop cases switch it off
        sections.append(routing_markdown(payload["routing_layer"], payload["routing_unet"], args))
    if "pipelines" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_sdxl(args, Path(tmp)) + bench_llava(args, Path(tmp))
        payload.update(methods=methods(args.k), rows=rows)
        sections.append(pipelines_markdown(rows, args))
    m = C.machine()
    header = (
        "# Batched multi-adapter generation\n\n"
        f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']} with {m['threads']} thread(s), "
        f"load average {m['loadavg']}, {m['date_utc']} UTC.\n\n"
    )
    C.write_results("batched_generation", payload, header + "\n".join(sections))


if __name__ == "__main__":
    main()
