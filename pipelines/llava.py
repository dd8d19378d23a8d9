"""Our adapters in a transformers LLaVA (or LLaMA) model, and batched side-by-side answers.

:class:`LlavaAdapters` loads saved adapters by name into a ``LlavaForConditionalGeneration`` (or a
``LlamaForCausalLM``: text-only questions), switches, disables, scales, merges, and answers:

* :meth:`LlavaAdapters.answer` — one greedy answer with one adapter (or the base);
* :meth:`LlavaAdapters.answer_batch` — K adapters in ONE batched greedy ``generate``: the image and
  question are repeated K times (identical rows, so no padding) and row ``i`` goes through adapter
  ``i`` via ``mm_subspace.forward_context(model, adapter_rows=...)``, prefill and every decoding step.
  Greedy decoding is deterministic, so row ``i`` equals ``answer(adapter_i)``.

Training lives in :mod:`mm_subspace.training` (the demo loops in :mod:`mm_subspace.training.demo_adapters`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import AdapterInfo, AdapterSet

if TYPE_CHECKING:
    import PIL.Image
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Answer", "LlavaAdapters", "check_llava_request", "save_merged_llava"]

BASE_LABEL = "base"
MAX_NEW_TOKENS = 256
MAX_QUESTION_CHARS = 2000


@dataclass
class Answer:
    """One adapter's answer: ``label`` (adapter name or ``"base"``), text, seconds, adapter info."""

    label: str
    text: str
    seconds: float
    info: AdapterInfo | None = None
    batched: bool = False

    def caption(self) -> str:
        how = "batched share" if self.batched else "own run"
        what = self.info.summary() if self.info is not None else "no adapter"
        return f"{self.label} — {what} — {self.seconds:.2f} s ({how})"


def check_llava_request(question: str, max_new_tokens: int, rows: int) -> None:
    """Raise ``ValueError`` naming the problem for an empty/overlong question or absurd lengths."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty: ask something about the image")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question is {len(question)} characters long; at most {MAX_QUESTION_CHARS}")
    if not float(max_new_tokens).is_integer() or not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if rows < 1:
        raise ValueError("select at least one adapter (or the base) to answer")


class LlavaAdapters(AdapterSet):
    """A transformers LLaVA / LLaMA model with several of our adapters.

    Args:
        model: ``LlavaForConditionalGeneration`` or ``LlamaForCausalLM`` (adapted in place).
        processor: its ``LlavaProcessor`` (LLaVA) or tokenizer (LLaMA); must carry a chat template.
    """

    family = "llava"

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__({"model": model})
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.has_vision = hasattr(model.config, "vision_config")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str] | None = None, torch_dtype: torch.dtype | None = None
    ) -> LlavaAdapters:
        """Load a LLaVA (or LLaMA) folder / hub id with its processor; ``None`` = the tiny offline LLaVA."""
        import torch

        if pretrained_model_name_or_path is None:
            from mm_subspace.tiny_models import tiny_llava

            return cls(*tiny_llava(torch_dtype))
        from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        dtype = torch_dtype or torch.float32
        if hasattr(config, "vision_config"):
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(pretrained_model_name_or_path, dtype=dtype)
            return cls(model, AutoProcessor.from_pretrained(pretrained_model_name_or_path))
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(pretrained_model_name_or_path))

    # -- inputs -------------------------------------------------------------------------------------
    def prompt(self, question: str, with_image: bool, answer: str | None = None) -> str:
        """The chat-template text of one user turn (with an ``<image>`` slot) and, for training, the answer."""
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        # a real LLaVA keeps its template on the processor; the tiny one has it on both
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)

    def inputs(self, question: str, image: PIL.Image.Image | None, k: int = 1, answer: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for ``k`` identical rows (processor for an image, tokenizer for text only)."""
        with_image = image is not None and self.has_vision
        text = [self.prompt(question, with_image, answer)] * k
        if with_image:
            return dict(self.processor(images=[image.convert("RGB")] * k, text=text, return_tensors="pt", add_special_tokens=False))
        return dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=False))

    # -- answers --------------------------------------------------------------------------------------
    def _generate(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[str]:
        import torch

        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad(), _prompt_routing(self.model, inputs["attention_mask"]):
            out = self.model.generate(
                **inputs, max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1]:]
        special = set(self.tokenizer.all_special_ids)
        rows = [[t for t in row.tolist() if t not in special] for row in new]
        # an answer of only special tokens (eos at once) is "": the fast tokenizer's Strip decoder panics on empty input
        return [self.tokenizer.decode(row).strip() if row else "" for row in rows]

    def answer(self, image: PIL.Image.Image | None, question: str, adapter: str | None = None, max_new_tokens: int = 16) -> Answer:
        """Greedy answer with only ``adapter`` active (``None`` = the base model)."""
        with self.using(adapter):
            start = time.perf_counter()
            text = self._generate(self.inputs(question, image), max_new_tokens)[0]
            seconds = time.perf_counter() - start
        return Answer(adapter or BASE_LABEL, text, seconds, self.adapters.get(adapter) if adapter else None)

    def answer_batch(
        self,
        image: PIL.Image.Image | None,
        question: str,
        adapters: Sequence[str | None],
        max_new_tokens: int = 16,
        scales: dict[str, float] | None = None,
    ) -> list[Answer]:
        """Answers of K adapters (``None`` = base) to one image and question, in one batched ``generate``."""
        adapters = self.batch_rows(adapters, scales, "answer_batch")
        with self.routed(adapters):
            start = time.perf_counter()
            texts = self._generate(self.inputs(question, image, k=len(adapters)), max_new_tokens)
            seconds = (time.perf_counter() - start) / len(adapters)
        return [
            Answer(name or BASE_LABEL, text, seconds, self.adapters.get(name) if name else None, batched=True)
            for name, text in zip(adapters, texts)
        ]


def _prompt_routing(model: nn.Module, attention_mask: torch.Tensor) -> contextlib.AbstractContextManager:
    """SuLoRA's routing rule for ``generate``: route once on the prompt, reuse it in the decode steps."""
    from mm_subspace.inject import get_state, routing

    if get_state(model, required=False) is None:
        return contextlib.nullcontext()
    return routing(model, attention_mask, cache=True)


def save_merged_llava(
    model_name_or_path: str | os.PathLike[str], adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Path:
    """One step from an adapter to a full model: load the base in full precision, fold the adapter, ``save_pretrained``.

    Works for adapters trained on a 4-bit base too (QLoRA practice: merge into the full-precision
    weights). The fully trained projector of ``--tune_projector full`` is part of the adapter file and
    lands in the merged model. The processor is saved beside it, so ``from_pretrained(out_dir)`` is all
    a user needs. Raises :class:`mm_subspace.MergeError` for methods that cannot fold (SuLoRA, ...).
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import mm_subspace as mms

    model = LlavaForConditionalGeneration.from_pretrained(model_name_or_path, dtype=torch.float32)
    mms.load_adapter(model, adapter_dir, "merge")
    merged = mms.merge_and_unload(model)
    out = Path(out_dir)
    merged.save_pretrained(out)
    AutoProcessor.from_pretrained(model_name_or_path).save_pretrained(out)
    return out
