"""Run the four benchmarks one after another and write ``benchmarks/README.md`` from their results.

    python benchmarks/run_all.py                    # the issue's LLaMA shape (4 layers, hidden 1024, seq 256, batch 4)
    python benchmarks/run_all.py --hidden 512 --seq 128 --threads 2 --note "shared machine"
    python benchmarks/run_all.py --report-only      # rebuild README.md from benchmarks/results/

Flags other than ``--note``/``--report-only`` are passed to step_time.py, memory.py and inference.py
(param_counts.py takes none). Wall time of each script goes into the README (budget: 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common as C

SCRIPTS = ("param_counts.py", "step_time.py", "memory.py", "inference.py")
FINDINGS = "## Findings"  # a hand-written section of README.md from this heading on is kept on rewrite
SHAPE_FLAGS = ("--layers", "--hidden", "--seq", "--batch", "--threads")


def run(args: argparse.Namespace, passthrough: list[str]) -> dict[str, float]:
    walls = {}
    for script in SCRIPTS:
        flags = [] if script == "param_counts.py" else list(passthrough)
        if script == "step_time.py" and args.repeats:
            flags += ["--repeats", str(args.repeats)]
        print(f"\n===== {script} {' '.join(flags)}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(C.ROOT / script), *flags], check=True)
        walls[script] = time.perf_counter() - start
    (C.RESULTS / "wall_times.json").write_text(json.dumps(walls, indent=2) + "\n")
    return walls


def section(name: str, title: str) -> str:
    path = C.RESULTS / f"{name}.md"
    if not path.exists():
        return f"## {title}\n\nNot run yet (`python benchmarks/{name}.py`).\n"
    return f"## {title}\n\n`python benchmarks/{name}.py` → `results/{name}.json`\n\n{path.read_text().strip()}\n"


def report(note: str, command: str) -> str:
    meta_file = next((C.RESULTS / f"{n}.json" for n in ("step_time", "inference", "memory", "param_counts")
                      if (C.RESULTS / f"{n}.json").exists()), None)
    machine = json.loads(meta_file.read_text())["machine"] if meta_file else C.machine()
    walls_file = C.RESULTS / "wall_times.json"
    walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}
    wall_line = (", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()) + f"; total {sum(walls.values()) / 60:.1f} min"
                 if walls else "not recorded")
    parts = [
        "# Benchmarks\n",
        "Scripts, not tests: each measures its cases side by side in one process (interleaved repeats, median "
        "after warm-up; `memory.py` uses one fresh process per case for an honest peak), prints a table and writes "
        "JSON + Markdown into `results/`. Ratios to PEFT LoRA and to the frozen base are what to read: absolute "
        "times depend on the machine and its load.\n",
        "## Machine\n",
        f"- CPU: {machine['cpu']}, nproc {machine['nproc']}; torch {machine['torch']}, "
        f"`torch.set_num_threads({machine['threads']})`, Python {machine['python']}",
        f"- run: {machine['date_utc']} UTC, load average (1, 5, 15 min) {machine['loadavg']} when these results were written",
        f"- wall time: {wall_line}",
    ]
    if note:
        parts.append(f"- note: {note}")
    parts += [
        "",
        "Reproduce:\n",
        f"```\n{command}\n```\n",
        section("param_counts", "Trainable parameters (meta device, real configs)"),
        section("step_time", "Training step time"),
        section("memory", "Memory"),
        section("inference", "Inference latency"),
        section("batched_generation", "Batched multi-adapter generation (per-row routing, pipelines/)"),
    ]
    text = "\n".join(parts)
    readme = C.ROOT / "README.md"
    if readme.exists() and FINDINGS in readme.read_text():  # keep the hand-written reading of the numbers
        text = text.rstrip() + "\n\n" + FINDINGS + readme.read_text().split(FINDINGS, 1)[1]
    readme.write_text(text)
    print(f"wrote {C.ROOT / 'README.md'}")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--note", default="", help="e.g. 'the machine was shared with other jobs'")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="step_time.py repeats")
    args, passthrough = p.parse_known_args()
    unknown = [f for f in passthrough if f.startswith("--") and f.split("=")[0] not in SHAPE_FLAGS + ("--skip-unet",)]
    if unknown:
        p.error(f"unknown flags {unknown}; pass-through flags are {SHAPE_FLAGS} and --skip-unet")
    command = " ".join(["python benchmarks/run_all.py", *passthrough,
                        *(["--repeats", str(args.repeats)] if args.repeats else [])])
    if not args.report_only:
        run(args, passthrough)
    report(args.note, command)


if __name__ == "__main__":
    main()
