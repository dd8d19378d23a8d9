"""Shared fixtures."""

from __future__ import annotations

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
    """Run a training command until it has written ``training_state/checkpoint-1``, SIGKILL it, and keep only
    that checkpoint (as if the process died right after it): the start of the bit-exact resume tests."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpt = output_dir / "training_state" / "checkpoint-1"
    deadline = time.time() + timeout
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.is_dir(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for path in (output_dir / "training_state").iterdir():
        if path.name != "checkpoint-1":
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
