"""LLaVA-style visual-instruction data: records, label masking, batching, and the digits tasks.

Records use LLaVA's JSON conversation format (Liu et al. 2023, ``llava/train/train.py``)::

    {"id": "0001", "image": "0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nIs the digit even?"},
                       {"from": "gpt", "value": "no"},
                       {"from": "human", "value": "And plus one?"},
                       {"from": "gpt", "value": "eight"}]}

:class:`ConversationEncoder` renders a record with the processor's chat template and puts the loss
on the assistant tokens only: prompt, image and padding positions get ``IGNORE_INDEX`` (-100), as in
LLaVA's stage-2 instruction tuning. The assistant spans are found by rendering the conversation
prefix by prefix (up to each assistant turn with the generation prompt, then through it), so any
chat template works; each prefix's tokens must be a prefix of the next one's. If they are not (a
template or tokenizer that re-tokenizes across a turn boundary), the record is an error naming it
(LLaVA#1166: a silent mismatch there made whole samples ``IGNORE_INDEX`` and the loss zero).

Bad records (``<image>`` without an image, an image without ``<image>``, a missing image file, turns
that do not alternate human/gpt, no assistant token left after truncation) raise :class:`DataError`
naming the record; so do an image path resolving outside ``image_folder`` (``..``, absolute, a symlink
out of it; ``allow_outside=True`` accepts it) and an image that is a decompression bomb, truncated or
not an image. :func:`encode_records` with ``skip_bad_records=True`` drops them with a warning and a
count instead. Text longer than ``max_length`` is truncated with a warning and a count.

The default data set, :func:`digits_instruction_records`, builds five instruction tasks over the same
scikit-learn digits scans (1,797 real 8x8 images) with a fixed stratified 75/25 split; the shipped tiny
LLaVA (``tiny-llava-digits``) was pretrained on captions of the train part only, never on these tasks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from .files import load_image, parse_json, read_text, resolve_inside

if TYPE_CHECKING:
    import PIL.Image
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTION_PROMPTS",
    "DIGIT_TASKS",
    "DIGIT_WORDS",
    "IGNORE_INDEX",
    "ConversationEncoder",
    "Encoded",
    "Record",
    "collate",
    "digit_caption",
    "digit_facts",
    "digit_image",
    "digits_instruction_records",
    "digits_split",
    "encode_records",
    "exact_match",
    "load_llava_json",
    "normalize_answer",
    "records_from_llava_json",
]

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: prompts of the captioning pretraining (the instruction tasks below are never among them)
CAPTION_PROMPTS = ("describe the image.", "what is in the image?", "what do you see?")


# --------------------------------------------------------------------------- records
@dataclass
class Record:
    """One conversation: ``id``, an image (PIL) or ``None``, and chat ``messages``.

    ``messages`` alternate ``{"role": "user" | "assistant", "content": str}``; the user turn that
    holds the image has ``IMAGE_PLACEHOLDER`` in its text. ``meta`` carries anything else (the digits
    task name and label for the evaluation).
    """

    id: str
    messages: list[dict[str, str]]
    image: PIL.Image.Image | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _bad(record_id: str, problem: str) -> DataError:
    return DataError(f"record {record_id!r}: {problem}")


def records_from_llava_json(
    raw: Sequence[dict[str, Any]], image_folder: str | os.PathLike[str] | None = None, source: str = "data",
    allow_outside: bool = False,
) -> list[Record | DataError]:
    """Turn LLaVA JSON records into :class:`Record` s; a malformed record becomes its :class:`DataError`.

    Checks: ``conversations`` is a non-empty list alternating ``human``/``gpt`` from ``human`` to
    ``gpt``; ``<image>`` appears (once) iff the record has an ``image``; the image path resolves inside
    ``image_folder`` (default: the working directory; ``..``, absolute paths and symlinks out of it are
    refused unless ``allow_outside=True``), exists and opens as an image
    (:func:`~mm_subspace.data.files.load_image`: decompression bombs, truncated and corrupt files are
    the record's error; 16-bit and float images are scaled to 8 bit by their real range).
    """
    out: list[Record | DataError] = []
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    for n, item in enumerate(raw):
        rid = str(item.get("id", f"{source}[{n}]")) if isinstance(item, dict) else f"{source}[{n}]"
        try:
            if not isinstance(item, dict):
                raise _bad(rid, f"is a {type(item).__name__}, expected an object with 'conversations'")
            turns = item.get("conversations")
            if not isinstance(turns, list) or not turns:
                raise _bad(rid, "has no 'conversations' list (LLaVA format: [{'from': 'human', 'value': ...}, ...])")
            messages = []
            for k, turn in enumerate(turns):
                if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                    raise _bad(rid, f"turn {k} is not {{'from': ..., 'value': <text>}}")
                role = roles.get(str(turn.get("from", "")).lower())
                if role is None:
                    raise _bad(rid, f"turn {k} is from {turn.get('from')!r}; expected 'human' or 'gpt'")
                expected = "user" if k % 2 == 0 else "assistant"
                if role != expected:
                    raise _bad(rid, f"turns do not alternate: turn {k} is from {turn.get('from')!r}, expected "
                               f"{'human' if expected == 'user' else 'gpt'} (human, gpt, human, gpt, ...)")
                messages.append({"role": role, "content": turn["value"]})
            if messages[-1]["role"] != "assistant":
                raise _bad(rid, "ends with a human turn: nothing to learn from its last question (drop it or answer it)")
            n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
            image = None
            if item.get("image"):
                if n_placeholders == 0:
                    raise _bad(rid, f"has an image ({item['image']}) but no {IMAGE_PLACEHOLDER} in its text: "
                               f"put {IMAGE_PLACEHOLDER} where the image goes (e.g. '{IMAGE_PLACEHOLDER}\\n' + question)")
                if not isinstance(item["image"], str):
                    raise _bad(rid, f"'image' is a {type(item['image']).__name__}, expected a path string")
                path = resolve_inside(image_folder or ".", item["image"], f"record {rid!r}", allow_outside)
                if not path.is_file():
                    raise _bad(rid, f"image file {path} does not exist (check --image_folder)")
                image = load_image(path, f"record {rid!r}: image file")
            elif n_placeholders:
                raise _bad(rid, f"has {IMAGE_PLACEHOLDER} in its text but no 'image' field: add the image or "
                           f"remove {IMAGE_PLACEHOLDER}")
            if n_placeholders > 1:
                raise _bad(rid, f"has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders; one image per record is supported")
            meta = {k: v for k, v in item.items() if k not in ("id", "image", "conversations")}
            out.append(Record(rid, messages, image, meta))
        except DataError as err:
            out.append(err)
    return out


def load_llava_json(data_path: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None = None,
                    allow_outside: bool = False) -> list[Record | DataError]:
    """Read a LLaVA JSON (a list) or JSONL file; see :func:`records_from_llava_json`.

    The file is UTF-8 (a BOM is dropped); invalid UTF-8, a NUL byte, invalid or too deeply nested
    JSON raise :class:`DataError` naming the file and line. ``allow_outside`` accepts image paths
    that resolve outside ``image_folder``.
    """
    path = Path(data_path)
    if not path.is_file():
        raise DataError(f"--data_path {path} does not exist")
    text = read_text(path)
    if text.lstrip().startswith("["):
        raw = parse_json(text, path)
    else:
        raw = [parse_json(line, path, n) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not raw:
        raise DataError(f"{path} holds no records: the data set is empty")
    if not isinstance(raw, list):
        raise DataError(f"{path} is a JSON {type(raw).__name__}, expected a list of LLaVA records")
    return records_from_llava_json(raw, image_folder, source=path.name, allow_outside=allow_outside)


# --------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Token ids and labels of one record (labels ``IGNORE_INDEX`` outside assistant tokens)."""

    id: str
    input_ids: list[int]
    labels: list[int]
    image: PIL.Image.Image | None
    truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def _chat_content(text: str) -> list[dict[str, str]]:
    """``"<image>\\nquestion"`` -> ``[{"type": "image"}, {"type": "text", "text": "question"}]``."""
    parts: list[dict[str, str]] = []
    with_image = IMAGE_PLACEHOLDER in text
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        chunk = chunk.strip("\n") if with_image else chunk
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


class ConversationEncoder:
    """Tokenize conversations with a LLaVA processor (or a plain tokenizer) and mask the labels.

    Args:
        processor: a ``LlavaProcessor`` (or any processor with ``tokenizer``, ``image_processor``,
            ``image_token`` and a chat template), or a tokenizer with a chat template (text only).
        max_length: truncate longer records to this many tokens (default: the tokenizer's
            ``model_max_length``).
    """

    def __init__(self, processor: Any, max_length: int | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        owner = processor if getattr(processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise DataError("the processor/tokenizer has no chat template: set one (processor.chat_template = ...)")
        self._template_owner = owner
        self.max_length = int(max_length or min(getattr(self.tokenizer, "model_max_length", 2048), 1 << 20))
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        self._image_tokens: int | None = None
        self._memo: dict[tuple, tuple[list[int], list[int]]] = {}

    # -- pieces --------------------------------------------------------------------------------
    def image_token_count(self) -> int:
        """How many ``<image>`` tokens the processor expands one image into (measured once)."""
        if self._image_tokens is None:
            from PIL import Image

            size = getattr(self.processor.image_processor, "crop_size", None) or {"height": 32, "width": 32}
            dummy = Image.new("RGB", (int(size.get("width", 32)), int(size.get("height", 32))))
            ids = self.processor(text=self.image_token, images=dummy, return_tensors="pt", add_special_tokens=False)["input_ids"]
            self._image_tokens = int((ids == self.image_token_id).sum())
        return self._image_tokens

    def render(self, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
        """The chat-template text of ``messages`` (``<image>`` in a user text becomes an image item)."""
        chat = [{"role": m["role"], "content": _chat_content(m["content"])} for m in messages]
        return self._template_owner.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text, ``<image>`` expanded to :meth:`image_token_count` tokens."""
        if self.image_token and self.image_token in text:
            text = text.replace(self.image_token, self.image_token * self.image_token_count())
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))  # the template already wrote bos
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of a conversation ending with a user turn, plus the generation prompt (for ``generate``)."""
        key = ("prompt", *((m["role"], m["content"]) for m in messages))
        if key not in self._memo:
            self._memo[key] = (self.tokenize(self.render(messages, generation_prompt=True)), [])
        return list(self._memo[key][0])

    # -- records -------------------------------------------------------------------------------
    def encode(self, record: Record) -> Encoded:
        """Ids and labels of ``record``; loss on every assistant turn (multi-turn included).

        Raises:
            DataError: the prefix tokens do not line up with the full tokens, the image
                placeholder count is wrong, or truncation leaves no assistant token.
        """
        messages = record.messages
        has_placeholder = any(IMAGE_PLACEHOLDER in m["content"] for m in messages)
        if has_placeholder != (record.image is not None):
            what = "an <image> placeholder but no image" if has_placeholder else "an image but no <image> placeholder"
            raise _bad(record.id, f"has {what}")
        if has_placeholder and self.image_token is None:
            raise _bad(record.id, "has an image but the processor has no image token (text-only tokenizer)")
        key = tuple((m["role"], m["content"]) for m in messages)
        if key not in self._memo:  # records that differ only by their image tokenize alike
            self._memo[key] = self._ids_and_labels(record.id, messages)
        ids, labels = (list(x) for x in self._memo[key])
        truncated = len(ids) > self.max_length
        if truncated:
            if self.image_token_id is not None and self.image_token_id in ids[self.max_length:]:
                raise _bad(record.id, f"is {len(ids)} tokens long and truncation to {self.max_length} would cut the image "
                           "tokens; raise --model_max_length or shorten the record")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            reason = f"after truncation to {self.max_length} tokens" if truncated else "(empty assistant turns)"
            raise _bad(record.id, f"has no assistant token to learn from {reason}; it would give a zero loss")
        return Encoded(record.id, ids, labels, record.image, truncated, dict(record.meta))

    def _ids_and_labels(self, record_id: str, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for k, message in enumerate(messages):
            if message["role"] != ("user" if k % 2 == 0 else "assistant"):
                raise _bad(record_id, f"turns do not alternate user/assistant at turn {k}")
            full = self.tokenize(self.render(messages[: k + 1], generation_prompt=message["role"] == "user"))
            if full[: len(ids)] != ids:
                at = next(i for i, (a, b) in enumerate(zip(full, ids)) if a != b) if any(
                    a != b for a, b in zip(full, ids)) else len(full)
                raise _bad(record_id, f"label mask does not line up with its tokens at turn {k} (token {at}): the chat "
                           "template/tokenizer re-tokenizes across the turn boundary, so assistant tokens cannot be "
                           "located; fix the template or the record text")
            new = full[len(ids):]
            ids = full
            labels += list(new) if message["role"] == "assistant" else [IGNORE_INDEX] * len(new)
        if not messages or messages[-1]["role"] != "assistant":
            raise _bad(record_id, "does not end with an assistant turn")
        return ids, labels


def encode_records(
    encoder: ConversationEncoder, records: Iterable[Record | DataError], skip_bad_records: bool = False
) -> list[Encoded]:
    """Encode every record; stop on the bad ones (all listed) unless ``skip_bad_records``.

    Raises:
        DataError: a record is bad (the message names up to five, and the total), or none is left.
    """
    good: list[Encoded] = []
    bad: list[DataError] = []
    for record in records:
        if isinstance(record, DataError):
            bad.append(record)
            continue
        try:
            good.append(encoder.encode(record))
        except DataError as err:
            bad.append(err)
    if bad:
        listed = "\n  ".join(str(e) for e in bad[:5]) + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        if not skip_bad_records:
            raise DataError(f"{len(bad)} bad record(s); fix them or pass --skip_bad_records:\n  {listed}")
        logger.warning("skipping %d bad record(s) (--skip_bad_records):\n  %s", len(bad), listed)
    n_trunc = sum(e.truncated for e in good)
    if n_trunc:
        logger.warning("%d record(s) longer than %d tokens were truncated (raise --model_max_length to keep them whole)",
                       n_trunc, encoder.max_length)
    if not good:
        raise DataError("the data set is empty (no usable record)")
    return good


def collate(
    rows: Sequence[Encoded], pad_token_id: int, pixel_values: Callable[[Sequence[Any]], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (+ ``pixel_values`` of the rows with an image).

    Args:
        rows: encoded records.
        pad_token_id: the tokenizer's pad id (labels are padded with ``IGNORE_INDEX``).
        pixel_values: images -> ``[n, 3, H, W]`` (e.g. ``processor.image_processor``); needed when a row has one.
    """
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    images = [r.image for r in rows if r.image is not None]
    if images:
        if pixel_values is None:
            raise DataError("rows have images but no pixel_values function was given")
        batch["pixel_values"] = pixel_values(images)
    return batch


# --------------------------------------------------------------------------- scoring
def normalize_answer(text: str) -> str:
    """Lower-case, collapse spaces, strip surrounding spaces and trailing ``.``/``!``."""
    return " ".join(str(text).lower().split()).rstrip(".! ").strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Exact match after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


# --------------------------------------------------------------------------- digits
def digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[list[int], list[int]]:
    """Fixed stratified split of scikit-learn's 1,797 digits: ``(train indices, test indices)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(list(range(len(target))), test_size=test_fraction, random_state=seed, stratify=target)
    return sorted(train), sorted(test)


_DIGITS: Any = None


def _digits() -> Any:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        _DIGITS = load_digits()
    return _DIGITS


def digit_label(index: int) -> int:
    """The class (0-9) of digits scan ``index``."""
    return int(_digits().target[index])


def digit_image(index: int, size: int = 32) -> PIL.Image.Image:
    """Digits scan ``index`` as an RGB image, dark ink on white, upscaled (nearest) to ``size``."""
    import numpy as np
    from PIL import Image

    pixels = 255 - np.round(_digits().images[index] * (255 / 16)).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST).convert("RGB")


def digit_caption(digit: int) -> str:
    """The pretraining caption: ``"the digit seven."``."""
    return f"the digit {DIGIT_WORDS[digit]}."


def digit_facts() -> list[str]:
    """Plain-text number facts of the pretraining corpus (no image, no question)."""
    facts = [" ".join(DIGIT_WORDS[1:]) + ".", " ".join(str(d) for d in range(10)) + "."]
    for d in range(10):
        w, nxt = DIGIT_WORDS[d], DIGIT_WORDS[d + 1]
        facts += [
            f"{w} is an {'even' if d % 2 == 0 else 'odd'} number.",
            f"{w} is {'greater' if d > 5 else 'not greater'} than five.",
            f"{w} plus one is {nxt}.",
            f"after {w} comes {nxt}.",
            f"{w} is written {d}.",
            f"the number {d} is {w}.",
            # statements that use "yes"/"no", so the LM knows the words (never as answers to a question)
            f"{'yes' if d % 2 == 0 else 'no'}, {w} is {'' if d % 2 == 0 else 'not '}even.",
            f"{'yes' if d > 5 else 'no'}, {w} is {'' if d > 5 else 'not '}greater than five.",
        ]
    return facts


#: the held-out instruction tasks: name -> (question, answer of a digit)
DIGIT_TASKS: dict[str, tuple[str, Callable[[int], str]]] = {
    "even": ("is the digit even? answer yes or no.", lambda d: "yes" if d % 2 == 0 else "no"),
    "greater_than_five": ("is the digit greater than five? answer yes or no.", lambda d: "yes" if d > 5 else "no"),
    "plus_one": ("what is the digit plus one? answer with a word.", lambda d: DIGIT_WORDS[d + 1]),
    "numeral": ("write the digit as a numeral.", lambda d: str(d)),
    "word": ("which digit is it? answer with one word.", lambda d: DIGIT_WORDS[d]),
}


def digits_instruction_records(
    split: str = "train", tasks: Sequence[str] | None = None, seed: int = 0, limit: int | None = None
) -> list[Record]:
    """The default instruction set: every task of :data:`DIGIT_TASKS` on every image of ``split``.

    Args:
        split: ``"train"`` (75 %) or ``"test"`` (25 %) of :func:`digits_split`.
        tasks: subset of task names (default all five).
        seed: the split seed (keep 0: the shipped model was pretrained on split 0's train part).
        limit: keep only the first ``limit`` images (stratified order is kept), for quick runs.
    """
    names = list(tasks or DIGIT_TASKS)
    unknown = [t for t in names if t not in DIGIT_TASKS]
    if unknown:
        raise DataError(f"unknown digits task(s) {unknown}; known: {sorted(DIGIT_TASKS)}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    indices = digits_split(seed)[0 if split == "train" else 1]
    if limit is not None:
        indices = indices[:limit]
    records = []
    for index in indices:
        digit, image = digit_label(index), digit_image(index)
        for task in names:
            question, answer = DIGIT_TASKS[task]
            messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
                        {"role": "assistant", "content": answer(digit)}]
            records.append(Record(f"digits-{split}-{index}-{task}", messages, image,
                                  {"task": task, "answer": answer(digit), "digit": digit, "image_index": index}))
    return records
