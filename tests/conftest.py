"""Shared fixtures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import nn

import mm_subspace as mms


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models run several times faster on one thread than on two
    on a loaded 2-core machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, lr: float, steps: int = 30) -> tuple[float, float]:
    """``steps`` Adam steps of MSE on the trainable parameters; returns (first loss, last loss)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), target)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


@pytest.fixture
def fit():
    """The regression training loop shared by the per-method "30 steps reduce the loss" tests."""
    return _fit


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether a transformers model has activation checkpointing on (the transformers 5 name, or the old one)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def kill_at_first_checkpoint(cmd: list[str], output_dir: Path, timeout: float = 300, env: dict | None = None) -> None:
    """Run a training command until it has written ``checkpoint-1``, SIGKILL it, and keep only that checkpoint
    (as if the process died right after it): the start of the bit-exact resume tests."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpt = output_dir / "checkpoint-1"
    deadline = time.time() + timeout
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.is_dir(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for path in output_dir.iterdir():  # later checkpoints, or one half-written (.checkpoint-2.tmp)
        if re.fullmatch(r"\.?checkpoint-\d+(\.tmp)?", path.name) and path.name != "checkpoint-1":
            shutil.rmtree(path)


def run_two_cpu_processes(script: Path, args: list[str], env: dict | None = None, timeout: float = 600) -> tuple[str, str]:
    """``accelerate launch`` ``script`` on 2 CPU processes (gloo, as docs/ENVIRONMENT say); assert it succeeds and
    both ranks end with the same adapter digest; return the combined log and that digest."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    digests = dict(re.findall(r"rank (\d) adapter digest ([0-9a-f]{16})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
    assert "adapters identical on all 2 ranks" in log
    return log, digests["0"]


# --------------------------------------------------------------------------- a LLaMA-style LLaVA tokenizer
#: llava-hf's LLaVA-1.5 chat template (written from its format: ``USER: <image>\nq ASSISTANT: a ``, no ``</s>``)
LLAVA_HF_VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _llama_corpus() -> list[str]:
    from mm_subspace.data import llava as data

    lines = [data.digit_caption(d) for d in range(10)] + data.digit_facts() + [data.VICUNA_SYSTEM]
    lines += ["a white square.", "a black circle on a white background.", "what is in the image?", "describe the image."]
    for question, answer in data.DIGIT_TASKS.values():
        for d in range(10):
            # conversations as LLaVA writes them: a turn after </s> starts with USER, never after a space
            lines.append(f"{question} ASSISTANT: {answer(d)}</s>USER: {question} ASSISTANT: {answer(d)}</s>")
    return lines


def build_llama_llava_processor(folder: Path) -> Path:
    """A LLaVA-1.5-like processor folder with a real LLaMA-style tokenizer, written into ``folder``.

    The tokenizer is a SentencePiece BPE model with byte fallback and LLaMA's ``▁`` prefix (``<unk>``
    0, ``<s>`` 1, ``</s>`` 2), trained here (0.02 s) on our own digits captions, number facts and
    conversations, loaded as transformers' ``LlamaTokenizer`` (``legacy: false``), with ``<image>`` and
    ``<pad>`` added after the vocabulary as llava-hf does; llava-hf's vicuna chat template. As in
    LLaMA's vocabulary, ``USER`` is one piece and ``▁USER`` is not, so a turn that follows ``</s>`` is
    one token shorter than the same turn on its own: the case LLaVA's ``preprocess_v1`` corrects for.
    Returns ``folder / "llava"`` (``AutoProcessor.from_pretrained`` loads it; ``tokenizer.model`` beside).
    """
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer, LlavaProcessor

    from mm_subspace.tiny_models.vision import clip_image_processor

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_llama_corpus()), model_prefix=str(folder / "sp"), model_type="bpe", vocab_size=600,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    spm_dir = folder / "sentencepiece"
    spm_dir.mkdir(exist_ok=True)
    shutil.move(folder / "sp.model", spm_dir / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False, "add_bos_token": True, "add_eos_token": False, "model_max_length": 512}))
    tok = AutoTokenizer.from_pretrained(spm_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    processor = LlavaProcessor(image_processor=clip_image_processor(32), tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_HF_VICUNA_TEMPLATE, image_token="<image>")
    out = folder / "llava"
    processor.save_pretrained(out)
    shutil.copy(spm_dir / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def llama_llava_processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of :func:`build_llama_llava_processor` (built once per session)."""
    return build_llama_llava_processor(tmp_path_factory.mktemp("llama_tokenizer"))


def single_adapter_runs(model: torch.nn.Module, x: torch.Tensor, rows: list, batch_dim: int = 0) -> torch.Tensor:
    """What per-row routing must give: row i of ``x`` through adapter ``rows[i]`` alone (``None``: the base).

    One plain forward of the whole batch per adapter (``set_adapter``; ``disable_adapters`` for the base),
    then row i taken from its adapter's output along ``batch_dim``.
    """
    import mm_subspace as mms

    outs = {}
    for name in dict.fromkeys(rows):
        if name is None:
            with mms.disable_adapters(model):
                outs[name] = model(x)
        else:
            mms.set_adapter(model, name)
            outs[name] = model(x)
    return torch.stack([outs[name].select(batch_dim, i) for i, name in enumerate(rows)], batch_dim)


# -- the tiny adapted MLP shared by the io, atomic, inject and formats tests -------------------------------------
def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))


def adapted(method: str = "moslora", seed: int = 0, name: str = "default") -> nn.Sequential:
    m = net()
    torch.manual_seed(seed + 100)
    mms.inject(m, mms.config_for(method, rank=4, alpha=8, targets=["0", "2"], init_weights=False), adapter_name=name)
    return m


def snapshot(model: nn.Module) -> tuple:
    """Everything a failed call must leave as it was: tensors, requires_grad flags, module tree, adapters."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: c.to_dict() for k, c in mms.list_adapters(model).items()},
    )


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert after[0].keys() == before[0].keys() and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert after[1] == before[1], "requires_grad flags changed"
    assert after[2] == before[2], "module tree changed"
    assert after[3] == before[3], "adapters changed"


def disk(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``folder`` (temp files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


#: hypothesis settings for the property tests that build models (few, fixed examples)
FEW = settings(max_examples=40, derandomize=True, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# -- an official MoSLoRA checkpoint, written by hand (the formats and CLI tests) ---------------------------------
def write_official(folder: Path, model, targets: list[str], r: int = 4, alpha: float = 8.0, fmt: str = "safetensors",
                   seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Write an official-layout MoSLoRA checkpoint from known random tensors; returns module -> (A, AB, B)."""
    gen = torch.Generator().manual_seed(seed)
    factors, state = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            a = torch.randn(r, module.in_features, generator=gen) * 0.2
            ab = torch.randn(r, r, generator=gen) * 0.5
            b = torch.randn(module.out_features, r, generator=gen) * 0.2
            factors[name] = (a, ab, b)
            for key, value in (("lora_A", a), ("lora_AB", ab), ("lora_B", b)):
                state[f"base_model.model.{name}.{key}.weight"] = value
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_use_mixer": True, "target_modules": targets,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "init_lora_weights": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(state, folder / "adapter_model.bin")
    return factors


def _official_forward(model, factors, scaling: float):
    """The official code's forward, by hand: base(x) + lora_B(lora_AB(lora_A(x))) * scaling."""
    for name, (a, ab, b) in factors.items():
        def hook(mod, inputs, out, a=a, ab=ab, b=b):
            return out + F.linear(F.linear(F.linear(inputs[0], a), ab), b) * scaling
        model.get_submodule(name).register_forward_hook(hook)
    return model


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state (mixed precision included) once per process: an earlier in-process run's precision
    makes ``Accelerator(mixed_precision="fp16")`` raise, and a later run would silently inherit this test's. Reset
    it before and after the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def draw_triangles(folder: Path, n: int = 5, size: int = 64) -> Path:
    """``n`` hollow triangles (black on white, ``size`` px, shifted and thinned a little each): a subject that is
    no digit, as a user's own small images would be."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        dx, dy, inset = (i % 3 - 1) * 2, (i // 3 - 1) * 2, 4 + i % 2
        corners = [(size / 2 + dx, 10 + dy), (size - 10 + dx - inset, size - 12 + dy), (10 + dx + inset, size - 12 + dy)]
        ImageDraw.Draw(image).polygon(corners, outline="black", width=size // 10)
        image.save(folder / f"triangle_{i}.png")
    return folder
