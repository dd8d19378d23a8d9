#!/usr/bin/env python
"""Visual-instruction quality on the embedded default: adapters at equal trainable-parameter budgets.

    python benchmarks/visual_instruction_quality.py            # all three parts: 26.5 min on 2 idle cores

Runs ``training/visual_instruction.py`` in-process on the shipped tiny LLaVA (``tiny-llava-digits``)
and the five held-out digits tasks, and scores greedy exact match on the test split:

1. **methods** (``--methods``, ``--seeds``): lora, moslora, ts_mixing, asylora, sulora, dora, each at
   the rank whose trainable-parameter count is closest to LoRA's at ``--budget_rank`` (counted on the
   model, per method): per-task accuracy mean ± std over seeds, parameters, median s/step;
2. **MoSLoRA mixer init** (MoSLoRA Table 3: kaiming/orthogonal > identity/normal, zero fails to learn):
   kaiming_uniform (the paper's, a = √5), kaiming_unit (a = 1), orthogonal, identity, normal, zero;
3. **SuLoRA N sweep** (SuLoRA Table 7: best at N = 2r): N = r, 2r, 4r, with the step cost.

Runs are independent processes (``--jobs`` at a time, ``--threads`` torch threads each; the default 2 x 1
fills 2 cores), so s/step compares methods measured under the same load.
Writes ``benchmarks/results/visual_instruction_quality.{json,md,png}``. The base model's accuracy
(adapters off) is measured once. Not a test: numbers move with the machine and the seeds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from _common import RESULTS, machine, markdown_table, write_results

from mm_subspace.training import visual_instruction as vi

METHODS = ("lora", "moslora", "ts_mixing", "asylora", "sulora", "dora")
INITS = ("kaiming_uniform", "kaiming_unit", "orthogonal", "identity", "normal", "zero")


def budget_ranks(methods: list[str], budget_rank: int) -> dict[str, tuple[int, int, int]]:
    """method -> (rank, trainable params, stored params) with the trainable count closest to LoRA's at ``budget_rank``
    on the LM targets (stored ones add frozen tensors such as SuLoRA's and AsyLoRA's A)."""
    from mm_subspace.tiny_models import tiny_llava

    model, _ = tiny_llava()
    model.requires_grad_(False)
    out = {}
    for method in methods:
        rank = _common.budget_rank(model, method, budget_rank, vi.LLM_TARGETS)
        counts = _common.count_params(model, method, rank, vi.LLM_TARGETS)
        out[method] = (rank, counts.trainable, counts.stored)
    return out


def sweep_stored(rank: int, mults: tuple[int, ...]) -> dict[int, int]:
    """N multiple -> stored parameters of SuLoRA at ``rank`` with N = mult·rank (its trainable count is in the run)."""
    from mm_subspace.tiny_models import tiny_llava

    model, _ = tiny_llava()
    model.requires_grad_(False)
    return {m: _common.count_params(model, "sulora", rank, vi.LLM_TARGETS, num_subspaces=m * rank).stored for m in mults}


def run(args: argparse.Namespace, method: str, rank: int, seed: int, *extra: str, eval_base: bool = False) -> dict[str, Any]:
    """One training run + evaluation (in a worker process); the result fields the tables need."""
    with tempfile.TemporaryDirectory(prefix="viq-") as tmp:
        argv = ["--adapter", method, "--rank", str(rank), "--alpha", str(2 * rank), "--seed", str(seed),
                "--report_to", "none", "--threads", str(args.threads), "--output_dir", tmp,
                "--eval_limit", str(args.eval_limit), "--checkpointing_steps", "100000", "--freeze_vision_tower", *extra]
        if args.max_train_steps:
            argv += ["--max_train_steps", str(args.max_train_steps)]
        if eval_base:
            argv.append("--eval_base")
        start = time.perf_counter()
        result = vi.main(vi.parse_args(argv))
    keep = ("eval", "trainable_parameters", "seconds_per_step", "final_loss")
    return {**{k: result[k] for k in keep}, "wall_seconds": time.perf_counter() - start}


class Runner:
    """Submit runs to ``--jobs`` worker processes, spawned (torch's thread pools are not fork-safe)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.args = args
        self.pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, method: str, rank: int, seed: int, *extra: str, eval_base: bool = False) -> Any:
        return self.pool.submit(run, self.args, method, rank, seed, *extra, eval_base=eval_base)


def summarize(results: list[dict[str, Any]], name: str) -> dict[str, Any]:
    evals = [r["eval"][name] for r in results]
    tasks = sorted(evals[0]["tasks"])

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None

    return {
        "mean": stats([e["mean_accuracy"] for e in evals]),
        "tasks": {t: stats([e["tasks"][t]["accuracy"] for e in evals]) for t in tasks},
        "params": results[0]["trainable_parameters"],
        "s_per_step": statistics.median(r["seconds_per_step"] for r in results),
        "seeds": len(results),
    }


def pm(value: tuple[float, float | None]) -> str:
    """``mean ± std`` in %, or the bare value of a single seed (no spread to show)."""
    return f"{100 * value[0]:.1f}" if value[1] is None else f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ablation_seeds", type=int, default=1, help="seeds of the init ablation and the N sweep")
    parser.add_argument("--budget_rank", type=int, default=16, help="LoRA rank whose parameter count is the budget")
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: the script's embedded default")
    parser.add_argument("--eval_limit", type=int, default=100, help="test images (x 5 tasks) per evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    parser.add_argument("--parts", default="methods,init,sweep")
    parser.add_argument("--name", default="visual_instruction_quality",
                        help="results/<name>.{json,md,png}: run parts in parallel processes under different names")
    args = parser.parse_args()
    parts = args.parts.split(",")
    started = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m]
    ranks = budget_ranks(methods, args.budget_rank)
    payload: dict[str, Any] = {"args": vars(args), "ranks": ranks}
    defaults = vi.build_parser()
    md = [f"# Visual-instruction quality (tiny-llava-digits, 5 held-out digits tasks): {args.parts}\n",
          f"Greedy exact match on {args.eval_limit} test images × 5 tasks; adapters on the LM's q,k,v,o,gate,up,down only "
          f"(no vision adapters, so the budgets compare exactly); "
          f"equal trainable-parameter budget = LoRA r={args.budget_rank}; steps = "
          f"{args.max_train_steps or vi.EMBEDDED_MAX_STEPS}, batch {defaults.get_default('train_batch_size')}, lr "
          f"{defaults.get_default('learning_rate')} {defaults.get_default('lr_scheduler')} "
          f"(per method: {', '.join(f'{m} {lr:g}' for m, lr in vi.EMBEDDED_METHOD_LEARNING_RATES.items())}), "
          f"alpha = 2r, {args.jobs} runs at "
          f"a time with {args.threads} thread(s) each.\n"]
    rows, plot = [], {}
    runner = Runner(args)  # every part's runs are queued up front, so the workers never wait on the tables
    init_rank = ranks.get("moslora", (args.budget_rank, 0))[0]
    seeds, ablation = range(args.seeds), range(args.ablation_seeds)
    method_runs = {m: [runner.submit(m, ranks[m][0], s, eval_base=i == 0 and s == 0) for s in seeds]
                   for i, m in enumerate(methods)} if "methods" in parts else {}
    init_runs = {init: [runner.submit("moslora", init_rank, s, "--mixer_init", init) for s in ablation]
                 for init in INITS} if "init" in parts else {}
    sweep_runs = {mult: [runner.submit("sulora", args.budget_rank, s, "--num_subspaces", str(mult * args.budget_rank))
                         for s in ablation] for mult in (1, 2, 4)} if "sweep" in parts else {}
    if "methods" in parts:
        per_method = {}
        base = None
        for method, pending in method_runs.items():
            rank = ranks[method][0]
            results = [f.result() for f in pending]
            if base is None:
                base = results[0]["eval"]["base"]
            per_method[method] = summarize(results, method)
            print(method, rank, per_method[method]["mean"], f"{time.perf_counter() - started:.0f} s", flush=True)
        tasks = sorted(base["tasks"])
        headers = ["method", "rank", "trainable params", "stored params", "mean acc %", *[f"{t} %" for t in tasks], "s/step"]
        rows.append(["base (no adapter)", "–", 0, 0, f"{100 * base['mean_accuracy']:.1f}",
                     *[f"{100 * base['tasks'][t]['accuracy']:.1f}" for t in tasks], "–"])
        for method, s in per_method.items():
            rows.append([method, ranks[method][0], s["params"], ranks[method][2], pm(s["mean"]), *[pm(s["tasks"][t]) for t in tasks],
                         f"{s['s_per_step']:.3f}"])
            plot[method] = s["mean"]
        payload["methods"] = per_method
        payload["base"] = base
        md += [f"## Methods at equal budget ({args.seeds} seeds, mean ± std)\n", markdown_table(headers, rows), ""]
    if "init" in parts:
        init_rows, inits = [], {}
        rank = init_rank
        for init, pending in init_runs.items():
            inits[init] = summarize([f.result() for f in pending], "moslora")
            init_rows.append([init, pm(inits[init]["mean"])])
            print("init", init, inits[init]["mean"], flush=True)
        payload["mixer_init"] = inits
        md += [f"## MoSLoRA mixer init (rank {rank}, {args.ablation_seeds} seed(s); paper Table 3)\n",
               markdown_table(["mixer init", "mean acc %"], init_rows), ""]
    if "sweep" in parts:
        sweep_rows, sweep = [], {}
        rank = args.budget_rank
        stored = sweep_stored(rank, tuple(sweep_runs))
        for mult, pending in sweep_runs.items():
            sweep[f"N={mult}r"] = summarize([f.result() for f in pending], "sulora")
            s = sweep[f"N={mult}r"]
            s["stored"] = stored[mult]
            sweep_rows.append([f"N = {mult}r = {mult * rank}", s["params"], stored[mult], pm(s["mean"]), f"{s['s_per_step']:.3f}"])
            print("sweep", mult, s["mean"], flush=True)
        payload["sulora_sweep"] = sweep
        md += [f"## SuLoRA N sweep (r = {rank}, {args.ablation_seeds} seed(s); paper Table 7)\n",
               markdown_table(["N", "trainable params", "stored params", "mean acc %", "s/step"], sweep_rows), ""]
    runner.pool.shutdown()
    total = time.perf_counter() - started
    payload["wall_seconds"] = total
    md.append(f"Wall time {total / 60:.1f} min; machine: {machine()['cpu']}, load {machine()['loadavg']}.")
    if plot:
        _plot(plot, RESULTS / f"{args.name}.png", args.seeds)
        md.append(f"\n![methods]({args.name}.png)")
    write_results(args.name, payload, "\n".join(md))


def _plot(values: dict[str, tuple[float, float | None]], path: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    names = list(values)
    ax.bar(names, [100 * values[n][0] for n in names], yerr=[100 * (values[n][1] or 0.0) for n in names], capsize=4,
           color="#4c72b0")
    ax.set_ylabel("mean exact match %")
    ax.set_ylim(0, 100)
    ax.set_title(f"visual instruction, tiny-llava-digits (equal budget, {seeds} seed{'s' * (seeds > 1)}, mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
