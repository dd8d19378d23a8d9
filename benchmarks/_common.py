"""Shared helpers of the benchmark scripts: models, method cases, interleaved timing, output.

Every script measures its cases side by side in one process (except ``memory.py``, which needs one
fresh process per case for an honest peak), interleaving the repeats so that machine noise (other
jobs on a shared CPU) hits every case alike, and reports medians and ratios. Results go to
``benchmarks/results/<script>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

import mm_subspace as mms  # noqa: E402  (after the environment settings above)

RANK = 16
ALPHA = 32.0
SEED = 0


# -- machine ------------------------------------------------------------------------------------------
def set_threads(threads: int | None) -> int:
    """Fix ``torch.set_num_threads`` (default: all cores) and print it; returns the count used."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, torch.set_num_threads({threads}), nproc {os.cpu_count()}")
    return threads


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (goes into every result file)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in load] if load else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


# -- timing -------------------------------------------------------------------------------------------
def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Time every case ``repeats`` times, round-robin, after ``warmup`` rounds.

    Returns name -> list of seconds of ``clock`` (wall clock by default; ``time.thread_time`` counts only the CPU
    time of the calling thread, not the time other jobs on a shared machine take it off the CPU). Interleaving spreads load spikes over
    all cases; every
    other round runs in reverse order, so no case always follows the same neighbour.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases.items())
    for i in range(repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- models -------------------------------------------------------------------------------------------
@dataclass
class LlamaShape:
    """A LLaMA-shaped decoder from a config (random weights). The issue's default: 4 layers, hidden 1024."""

    layers: int = 4
    hidden: int = 1024
    seq: int = 256
    batch: int = 4
    vocab: int = 4096
    heads: int = 16

    @property
    def intermediate(self) -> int:
        # LLaMA's rule: 2/3 · 4·hidden, rounded up to a multiple of 256
        return -(-int(8 * self.hidden / 3) // 256) * 256

    def describe(self) -> str:
        return (f"LLaMA-shaped, {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads} heads, vocab {self.vocab}, batch {self.batch} x seq {self.seq}")


def add_shape_args(parser: argparse.ArgumentParser, repeats: int | None = 5) -> None:
    """The flags every script shares: LLaMA shape (the issue's default), threads, repeats."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: nproc)")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per case (median reported), >= 5")
    parser.add_argument("--skip-unet", action="store_true", help="only the LLaMA-shaped model")


def shape_of(args: argparse.Namespace) -> LlamaShape:
    return LlamaShape(layers=args.layers, hidden=args.hidden, seq=args.seq, batch=args.batch)


def llama_model(shape: LlamaShape, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=max(2048, shape.seq), tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(dtype).eval()


def llama_batch(shape: LlamaShape) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    return {"input_ids": ids, "labels": ids}


def llama_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    from mm_subspace.tiny_models import tiny_sdxl_path

    return UNet2DConditionModel.from_pretrained(tiny_sdxl_path(), subfolder="unet").eval()  # = tiny_sdxl_pipeline().unet


def unet_batch(unet: nn.Module, batch: int = 4) -> dict[str, Any]:
    cfg = unet.config
    gen = torch.Generator().manual_seed(SEED)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, text_dim, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        },
    }


def unet_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch).sample.float().pow(2).mean()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # MoSLoRA's commonsense set
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' DreamBooth LoRA SDXL set
LLAMA_ENTRY, UNET_ENTRY = "model.embed_tokens", "conv_in"  # where the frozen floor's backward starts


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are the original tensors (no extra memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


# -- method cases ---------------------------------------------------------------------------------------
@dataclass
class Case:
    """One row of a benchmark: a label, the method (``None`` for the frozen base, ``"peft"`` for PEFT LoRA)."""

    label: str
    method: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def sulora_cases() -> list[Case]:
    """SuLoRA at N = 1.5r, 2r, 2.5r (the SuLoRA paper's Table 11 sweep) — field name read from its config."""
    cfg_cls = mms.get_method("sulora").config_class
    names = cfg_cls.field_names()
    key = next((k for k in ("num_subspaces", "n_subspaces", "num_experts", "n_experts", "pool_size", "n") if k in names), None)
    if key is None:
        print(f"  note: SuLoRAConfig has no recognised subspace-count field ({sorted(names)}); using its default")
        return [Case("sulora", "sulora")]
    return [Case(f"sulora N={label}", "sulora", {key: int(factor * RANK)}) for label, factor in
            (("1.5r", 1.5), ("2r", 2.0), ("2.5r", 2.5))]


def method_cases(include_frozen: bool = True, include_peft: bool = True, verbose: bool = True) -> list[Case]:
    """The issue's set, skipping (with a printed note) methods not registered yet."""
    available = set(mms.list_methods())
    cases: list[Case] = []
    if include_frozen:
        cases.append(Case("frozen base", None, note="backprop to the input embeddings, no optimizer"))
    if include_peft:
        cases.append(Case("PEFT LoRA", "peft"))
    for name in ("lora", "moslora", "ts_mixing", "dora", "sulora", "asylora"):
        if name not in available:
            if verbose:
                    print(f"  note: method {name!r} is not in mm_subspace.list_methods() yet; skipped")
            continue
        cases.extend(sulora_cases() if name == "sulora" else [Case(name, name)])
    return cases


def adapt(model: nn.Module, case: Case, targets: list[str], entry: str) -> nn.Module:
    """A weight-sharing copy of ``model`` with ``case``'s adapter (PEFT's and our default init).

    For the frozen base, the output of submodule ``entry`` (the embedding, the UNet's ``conv_in``) is
    made to require grad, so backward runs through every layer as it must to reach the adapters.
    """
    torch.manual_seed(SEED)
    copy_ = share_weights_copy(model)
    if case.method is None:
        for p in copy_.parameters():
            p.requires_grad_(False)
        # the floor: gradients still flow through every layer (as they must to reach the adapters)
        copy_.get_submodule(entry).register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return copy_
    if case.method == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
        return get_peft_model(copy_, cfg)
    config = mms.config_for(case.method, rank=RANK, alpha=ALPHA, targets=targets, **case.kwargs)
    return mms.inject(copy_, config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step_fn(model: nn.Module, loss_fn: Callable, batch: Any) -> Callable[[], float]:
    """Closure doing forward + backward + AdamW step on ``model`` (no optimizer when nothing trains)."""
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> float:
        loss = loss_fn(model, batch)
        aux = mms.aux_loss(model) if hasattr(model, "_mm_subspace_state") else None
        if aux is not None:
            loss = loss + aux
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


# -- output ---------------------------------------------------------------------------------------------
def count_params(model: nn.Module, method: str, rank: int, targets: Any, **extra: Any) -> mms.ParameterCounts:
    """Trainable and stored (frozen tensors included) parameters of ``method`` at ``rank`` on ``targets`` of ``model``,
    counted on an adapter injected under a temporary name and removed again."""
    mms.inject(model, mms.config_for(method, rank=rank, targets=targets, **extra), "_count")
    try:
        mms.set_adapter(model, "_count")
        return mms.parameter_counts(model, "_count")
    finally:
        mms.remove_adapter(model, "_count")


def budget_rank(model: nn.Module, method: str, lora_rank: int, targets: Any) -> int:
    """The rank of ``method`` whose trainable count on ``targets`` is closest to LoRA's at ``lora_rank`` (ties: the
    smaller rank; TS-Mixing takes even ranks only). Equal budgets compare trainable parameters, not stored ones."""
    budget = count_params(model, "lora", lora_rank, targets).trainable
    candidates = range(2, 4 * lora_rank + 1, 2) if method == "ts_mixing" else range(1, 4 * lora_rank + 1)
    return min(candidates, key=lambda r: (abs(count_params(model, method, r, targets).trainable - budget), r))


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,d}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    """Write ``results/<name>.json`` (payload + machine) and ``results/<name>.md``; print the Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"wrote {RESULTS / name}.json and .md")
