"""LLaVA-style visual-instruction data: records, label masking, batching, and the digits tasks.

Records use LLaVA's JSON conversation format (Liu et al. 2023, ``llava/train/train.py``)::

    {"id": "0001", "image": "0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nIs the digit even?"},
                       {"from": "gpt", "value": "no"},
                       {"from": "human", "value": "And plus one?"},
                       {"from": "gpt", "value": "eight"}]}

:class:`ConversationEncoder` writes a record in a conversation format and puts the loss on the
assistant tokens only: prompt, image and padding positions get ``IGNORE_INDEX`` (-100), as in LLaVA's
stage-2 instruction tuning. The formats LLaVA and the MoSLoRA paper train with are data
(:data:`TEMPLATES`, :class:`ConversationTemplate`):

* ``vicuna_v1`` — LLaVA-1.5 (``llava/conversation.py::conv_vicuna_v1``, ``train.py::preprocess_v1``):
  ``<system> USER: <image>\nquestion ASSISTANT: answer</s>USER: ... ASSISTANT: answer</s>``; every
  ``answer</s>`` is supervised (so the model learns to stop), nothing else;
* ``llama3_chat`` — XTuner's LLaMA3 template, the MoSLoRA paper's visual-instruction setup (Table 8):
  ``<|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n``
  then ``answer<|eot_id|>`` supervised;
* ``plain`` — LLaVA's pretraining stage (``preprocess_plain``): ``<image>caption\n``, the caption and
  its newline supervised;
* ``auto`` (the default) — the processor's chat template decides: one that renders ``USER: q ASSISTANT:``
  (llava-hf's LLaVA-1.5 template) is ``vicuna_v1``, one with LLaMA3 headers ``llama3_chat``; any other
  template is used as it is (rendered turn by turn with ``apply_chat_template``).

As in LLaVA's ``preprocess_multimodal``, ``<image>`` is moved to the start of its human turn followed
by a newline. The text is tokenized as one string (what the processor gives at inference) and the
supervised spans are located turn by turn: the tokens of the conversation up to each turn boundary
must be a prefix of the whole. If they are not (a template or tokenizer that re-tokenizes across a
turn boundary), the record is an error naming it (LLaVA#1166: a silent mismatch there made whole
samples ``IGNORE_INDEX`` and the loss zero).

:class:`LlavaDataset` is the lazy training set: it keeps the records' text and image paths (compact
JSON bytes for a file, :class:`CompactRecords`) and decodes, processes and tokenizes one record in
``__getitem__``, so host memory does not grow with the number of images.

Bad records (``<image>`` without an image, an image without ``<image>``, ``<image>`` in a gpt turn, a
missing image file, turns that do not alternate human/gpt, no assistant token left after truncation) raise :class:`DataError`
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
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    "TEMPLATES",
    "TEMPLATE_CHOICES",
    "VICUNA_SYSTEM",
    "CompactRecords",
    "ConversationEncoder",
    "ConversationTemplate",
    "Encoded",
    "LlavaDataset",
    "Record",
    "collate",
    "detect_template",
    "digit_caption",
    "digit_facts",
    "digit_image",
    "digits_instruction_records",
    "digits_split",
    "encode_records",
    "exact_match",
    "iter_llava_json",
    "load_llava_json",
    "modality_grouped_indices",
    "modality_grouped_order",
    "modality_lengths",
    "normalize_answer",
    "parse_record",
    "records_from_llava_json",
    "report_bad_records",
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
    holds the image has ``IMAGE_PLACEHOLDER`` in its text. ``image_path`` is the image file of a record
    read lazily (:class:`CompactRecords`): it is decoded when the record is used. ``meta`` carries
    anything else (the digits task name and label for the evaluation).
    """

    id: str
    messages: list[dict[str, str]]
    image: PIL.Image.Image | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image_path: Path | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_path is not None

    def loaded(self) -> Record:
        """This record with its image decoded (itself when the image is in memory already or it has none)."""
        if self.image is not None or self.image_path is None:
            return self
        image = load_image(self.image_path, f"record {self.id!r}: image file")
        return Record(self.id, self.messages, image, self.meta, self.image_path)


def _bad(record_id: str, problem: str) -> DataError:
    return DataError(f"record {record_id!r}: {problem}")


def _check_image_placement(record_id: str, messages: Sequence[dict[str, str]]) -> int:
    """The number of ``<image>`` placeholders; one in a gpt turn is the record's error."""
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
            raise _bad(record_id, f"has {IMAGE_PLACEHOLDER} in turn {k}, a gpt turn: the image belongs in a human turn "
                       "(its tokens would be trained as the answer); move it to the question")
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def parse_record(item: Any, n: int, source: str = "data", image_folder: str | os.PathLike[str] | None = None,
                 allow_outside: bool = False, decode: bool = True) -> Record:
    """One LLaVA JSON record as a :class:`Record` (``n``: its position, for the name of an id-less record).

    ``decode=False`` checks that the image file exists and keeps its path (``Record.image_path``)
    instead of decoding it. See :func:`records_from_llava_json` for the checks.

    Raises:
        DataError: the record is malformed (the message names it and the fix).
    """
    rid = str(item.get("id", f"{source}[{n}]")) if isinstance(item, dict) else f"{source}[{n}]"
    if not isinstance(item, dict):
        raise _bad(rid, f"is a {type(item).__name__}, expected an object with 'conversations'")
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _bad(rid, "has no 'conversations' list (LLaVA format: [{'from': 'human', 'value': ...}, ...])")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _bad(rid, f"turn {k} is not {{'from': ..., 'value': <text>}}")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise _bad(rid, f"turn {k} is from {turn.get('from')!r}; expected 'human' or 'gpt'")
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise _bad(rid, f"turns do not alternate: turn {k} is from {turn.get('from')!r}, expected "
                       f"{'human' if expected == 'user' else 'gpt'} (human, gpt, human, gpt, ...)")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise _bad(rid, "ends with a human turn: nothing to learn from its last question (drop it or answer it)")
    n_placeholders = _check_image_placement(rid, messages)
    image = path = None
    if item.get("image"):
        if n_placeholders == 0:
            raise _bad(rid, f"has an image ({item['image']}) but no {IMAGE_PLACEHOLDER} in its text: "
                       f"put {IMAGE_PLACEHOLDER} where the image goes (e.g. '{IMAGE_PLACEHOLDER}\\n' + question)")
        if not isinstance(item["image"], str):
            raise _bad(rid, f"'image' is a {type(item['image']).__name__}, expected a path string")
        path = resolve_inside(image_folder or ".", item["image"], f"record {rid!r}", allow_outside)
        if not path.is_file():
            raise _bad(rid, f"image file {path} does not exist (check --image_folder)")
        if decode:
            image = load_image(path, f"record {rid!r}: image file")
    elif n_placeholders:
        raise _bad(rid, f"has {IMAGE_PLACEHOLDER} in its text but no 'image' field: add the image or "
                   f"remove {IMAGE_PLACEHOLDER}")
    if n_placeholders > 1:
        raise _bad(rid, f"has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders; one image per record is supported")
    meta = {k: v for k, v in item.items() if k not in ("id", "image", "conversations")}
    return Record(rid, messages, image, meta, path)


def records_from_llava_json(
    raw: Iterable[Any], image_folder: str | os.PathLike[str] | None = None, source: str = "data",
    allow_outside: bool = False,
) -> list[Record | DataError]:
    """Turn LLaVA JSON records into :class:`Record` s; a malformed record becomes its :class:`DataError`.

    Checks: ``conversations`` is a non-empty list alternating ``human``/``gpt`` from ``human`` to
    ``gpt``; ``<image>`` appears (once, in a human turn) iff the record has an ``image``; the image path
    resolves inside ``image_folder`` (default: the working directory; ``..``, absolute paths and
    symlinks out of it are refused unless ``allow_outside=True``), exists and opens as an image
    (:func:`~mm_subspace.data.files.load_image`: decompression bombs, truncated and corrupt files are
    the record's error; 16-bit and float images are scaled to 8 bit by their real range).
    """
    out: list[Record | DataError] = []
    for n, item in enumerate(raw):
        try:
            out.append(parse_record(item, n, source, image_folder, allow_outside))
        except DataError as err:
            out.append(err)
    return out


def iter_llava_json(data_path: str | os.PathLike[str]) -> Iterator[Any]:
    """The raw records of a LLaVA JSON (a list) or JSONL file, one at a time.

    A JSON list is decoded record by record (never the whole list of objects at once). The file is
    UTF-8 (a BOM is dropped); invalid UTF-8, a NUL byte, invalid or too deeply nested JSON raise
    :class:`DataError` naming the file and line; so do a missing file and one without records.
    """
    path = Path(data_path)
    if not path.is_file():
        raise DataError(f"--data_path {path} does not exist")
    text = read_text(path)
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):
        yield from _iter_json_list(text, start + 1, path)
        return
    if text.startswith(("{", '"'), start) or not text.strip():
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not lines:
            raise DataError(f"{path} holds no records: the data set is empty")
        first = parse_json(lines[0][1], path, lines[0][0]) if len(lines) > 1 else parse_json(text, path)
        if len(lines) == 1 and not isinstance(first, dict):
            raise DataError(f"{path} is a JSON {type(first).__name__}, expected a list of LLaVA records")
        yield first
        for n, line in lines[1:]:
            yield parse_json(line, path, n)
        return
    parse_json(text, path)  # names the line of the error
    raise DataError(f"{path} is not a list of LLaVA records")


def _iter_json_list(text: str, pos: int, path: Path) -> Iterator[Any]:
    import json

    decoder = json.JSONDecoder()
    n = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if text.startswith("]", pos):
            if text[pos + 1:].strip():
                raise DataError(f"{path} line {text.count(chr(10), 0, pos) + 1}: not valid JSON (text after the closing ']')")
            if n == 0:
                raise DataError(f"{path} holds no records: the data set is empty")
            return
        if n:
            if not text.startswith(",", pos):
                raise DataError(f"{path} line {text.count(chr(10), 0, pos) + 1}: not valid JSON (expected ',' or ']')")
            pos += 1
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply (Python's parser gives up; the record from line "
                            f"{text.count(chr(10), 0, pos) + 1}); records are flat objects") from None
        except ValueError as err:
            raise DataError(f"{path}: not usable JSON ({err}; the record from line {text.count(chr(10), 0, pos) + 1})") from None
        n += 1
        yield item


def load_llava_json(data_path: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None = None,
                    allow_outside: bool = False) -> list[Record | DataError]:
    """Read a LLaVA JSON (a list) or JSONL file with every image decoded (small sets: evaluation, tests).

    See :func:`iter_llava_json` and :func:`records_from_llava_json`; ``allow_outside`` accepts image
    paths that resolve outside ``image_folder``. Training sets are read lazily by :class:`CompactRecords`.
    """
    return records_from_llava_json(iter_llava_json(data_path), image_folder, Path(data_path).name, allow_outside)


class CompactRecords(Sequence[Record]):
    """The checked records of a LLaVA JSON/JSONL file, held as one compact byte buffer (no decoded image).

    Each good record is kept as its normalised JSON (id, image path, messages, meta) in one
    ``bytearray`` with an offset table, so memory is about the records' text whatever their number
    (no per-record Python objects, nothing for ``fork`` ed data-loader workers to copy), and images stay
    on disk until :meth:`Record.loaded`. Bad records are collected in :attr:`bad` (their
    :class:`DataError` s); :meth:`modality_lengths` is LLaVA's length per record (words, negative for
    text-only records) for :func:`modality_grouped_order`.
    """

    def __init__(self, data_path: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None = None,
                 allow_outside: bool = False) -> None:
        import json

        import numpy as np

        self.path = Path(data_path)
        self.bad: list[DataError] = []
        blob = bytearray()
        offsets, lengths = [0], []
        for n, item in enumerate(iter_llava_json(self.path)):
            try:
                rec = parse_record(item, n, self.path.name, image_folder, allow_outside, decode=False)
            except DataError as err:
                self.bad.append(err)
                continue
            blob += json.dumps([rec.id, str(rec.image_path) if rec.image_path else None, rec.messages, rec.meta],
                               ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            offsets.append(len(blob))
            words = sum(len(m["content"].split()) for m in rec.messages)
            lengths.append(max(1, words) * (1 if rec.image_path else -1))
        self._blob = bytes(blob)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        import json

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        rid, image, messages, meta = json.loads(self._blob[self._offsets[i]:self._offsets[i + 1]])
        return Record(rid, messages, None, meta, Path(image) if image else None)

    def modality_lengths(self) -> list[int]:
        """Words per record (LLaVA's ``modality_lengths``): positive with an image, negative without."""
        return self._lengths.tolist()


def modality_lengths(records: Sequence[Record]) -> list[int]:
    """LLaVA's ``modality_lengths`` of ``records``: words per record, positive with an image, negative without."""
    if isinstance(records, CompactRecords):
        return records.modality_lengths()
    return [max(1, sum(len(m["content"].split()) for m in r.messages)) * (1 if r.has_image else -1) for r in records]


def modality_grouped_order(lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0) -> list[int]:
    """An epoch's order of record indices grouped by modality and length (LLaVA's ``group_by_modality_length``).

    As ``llava/train/llava_trainer.py::get_modality_length_grouped_indices``: records with an image
    (positive ``lengths``) and text-only records (negative) are shuffled separately, cut into
    mega-batches of ``world_size * batch_size`` sorted by length, and the mega-batches are shuffled
    together, so every batch of ``batch_size`` consecutive indices per rank holds one modality (the
    last, mixed mega-batch comes last) and similar lengths (less padding). Deterministic in ``seed``.
    """
    import torch

    if any(n == 0 for n in lengths):
        raise DataError("modality_grouped_order: a record has length 0 (every record has at least one word)")
    gen = torch.Generator().manual_seed(int(seed))
    mega = world_size * batch_size

    def grouped(idx: list[int]) -> list[list[int]]:
        perm = [idx[int(j)] for j in torch.randperm(len(idx), generator=gen)]
        chunks = [sorted(perm[i:i + mega], key=lambda k: -abs(lengths[k])) for i in range(0, len(perm), mega)]
        return [_interleave(c, world_size) for c in chunks]

    image = grouped([i for i, n in enumerate(lengths) if n > 0])
    text = grouped([i for i, n in enumerate(lengths) if n < 0])
    tail = sorted((image.pop() if image else []) + (text.pop() if text else []))
    megabatches = image + text
    order = [megabatches[int(j)] for j in torch.randperm(len(megabatches), generator=gen)]
    return [i for chunk in order for i in chunk] + tail


_ORDERS: dict[tuple[int, int, int, int, int], list[int]] = {}


def modality_grouped_indices(lengths: Sequence[int], batch_size: int, micro_step: int, rank: int, world_size: int,
                             seed: int) -> list[int]:
    """Record indices of micro-batch ``micro_step`` on ``rank`` in :func:`modality_grouped_order` (a function of the
    step only, for bit-exact resume): epoch ``e`` is the order of seed ``seed + e``, walked one mega-batch of
    ``world_size * batch_size`` per micro step (the last one wraps to the epoch's start)."""
    mega = world_size * batch_size
    steps_per_epoch = -(-len(lengths) // mega)
    epoch, j = divmod(micro_step, steps_per_epoch)
    key = (id(lengths), len(lengths), batch_size, world_size, seed + epoch)
    if key not in _ORDERS:
        _ORDERS.clear()  # one epoch's order at a time
        _ORDERS[key] = modality_grouped_order(lengths, batch_size, world_size, seed + epoch)
    order = _ORDERS[key]
    chunk = order[j * mega:(j + 1) * mega]
    chunk += order[: mega - len(chunk)]
    return chunk[rank * batch_size:(rank + 1) * batch_size]


def _interleave(chunk: list[int], world_size: int) -> list[int]:
    """A length-sorted mega-batch laid out so rank ``r`` gets ``chunk[r::world_size]`` as its consecutive batch."""
    per_rank = [chunk[r::world_size] for r in range(world_size)]
    return [i for part in per_rank for i in part]


# --------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class ConversationTemplate:
    """A conversation format as LLaVA / XTuner train it: how turns are written and what is supervised.

    ``user`` and ``assistant`` are format strings with ``{content}``; the rendered assistant turn
    (answer and ``stop``) is the supervised span, everything else is masked. ``system_format`` (with
    ``{system}``) opens the conversation when a system prompt is given (``system`` is the default).
    ``image_only_user`` (LLaVA's ``plain`` pretraining): the human turn is the image alone.
    """

    name: str
    user: str
    assistant: str
    stop: str
    system: str = ""
    system_format: str = "{system}"
    image_only_user: bool = False
    cite: str = ""

    def segments(self, record_id: str, messages: Sequence[dict[str, str]], system: str | None = None) -> list[tuple[str, bool]]:
        """``[(text, supervised), ...]`` of ``messages``: one masked segment per human turn (the system prompt
        and the assistant header included), one supervised segment per answer."""
        if self.image_only_user and (len(messages) > 2 or IMAGE_PLACEHOLDER not in messages[0]["content"]):
            raise _bad(record_id, f"the {self.name} template (LLaVA pretraining) takes one human turn with "
                       f"{IMAGE_PLACEHOLDER} and one caption; this record has {len(messages)} turns"
                       f"{'' if IMAGE_PLACEHOLDER in messages[0]['content'] else ' and no image in its first turn'}")
        system = self.system if system is None else system
        out: list[tuple[str, bool]] = []
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                out.append((self.assistant.format(content=m["content"]), True))
                continue
            content = m["content"]
            if self.image_only_user:
                text = IMAGE_PLACEHOLDER
            else:
                if IMAGE_PLACEHOLDER in content:  # LLaVA's preprocess_multimodal: the image first, then a newline
                    content = IMAGE_PLACEHOLDER + "\n" + content.replace(IMAGE_PLACEHOLDER, "").strip()
                text = self.user.format(content=content)
            if k == 0 and system and not self.image_only_user:
                text = self.system_format.format(system=system) + text
            out.append((text, False))
        return out


#: LLaVA's system prompt of ``conv_vicuna_v1`` (``llava/conversation.py``)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna_v1": ConversationTemplate(
        "vicuna_v1", user="USER: {content} ASSISTANT:", assistant=" {content}</s>", stop="</s>", system=VICUNA_SYSTEM,
        system_format="{system} ",
        cite="LLaVA-1.5 (Liu et al. 2023): llava/conversation.py conv_vicuna_v1, llava/train/train.py preprocess_v1"),
    "llama3_chat": ConversationTemplate(
        "llama3_chat",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>", stop="<|eot_id|>",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        cite="XTuner PROMPT_TEMPLATE.llama3_chat (SUFFIX_AS_EOS), the MoSLoRA paper's LLaMA3 LLaVA setup (Table 8)"),
    "plain": ConversationTemplate(
        "plain", user="{content}", assistant="{content}\n", stop="", image_only_user=True,
        cite="LLaVA pretraining (feature alignment): llava/train/train.py preprocess_plain"),
}
#: ``--conversation_template`` choices
TEMPLATE_CHOICES = ("auto", *TEMPLATES)


def detect_template(owner: Any) -> tuple[ConversationTemplate | None, str]:
    """``(template, reason)`` for ``auto``: the format the processor's chat template writes.

    A probe question is rendered with the generation prompt: ``USER: q ASSISTANT:`` (llava-hf's
    LLaVA-1.5 template) is ``vicuna_v1``; LLaMA3 headers are ``llama3_chat``; anything else is ``None``
    (the chat template itself, rendered turn by turn).
    """
    import re

    chat = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    try:
        text = owner.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - any template error: fall back to the template itself
        return None, f"the chat template could not render a probe ({type(err).__name__}); using it as it is"
    tok = getattr(owner, "tokenizer", owner)
    bos = re.escape(getattr(tok, "bos_token", None) or "")
    if re.fullmatch(rf"(?:{bos})?\s*(?:.*\S\s)?USER: q ASSISTANT:\s*", text, re.DOTALL):
        return TEMPLATES["vicuna_v1"], "the chat template writes 'USER: … ASSISTANT:' (LLaVA-1.5's vicuna format)"
    if "<|start_header_id|>user<|end_header_id|>" in text:
        return TEMPLATES["llama3_chat"], "the chat template writes LLaMA3 headers"
    return None, f"the chat template writes {text[-60:]!r}, no known format; using it as it is, turn by turn"


# --------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Token ids and labels of one record (labels ``IGNORE_INDEX`` outside assistant tokens).

    ``pixel_values`` is the processed image (``[3, H, W]``) of a record encoded by :class:`LlavaDataset`.
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    image: PIL.Image.Image | None
    truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    pixel_values: torch.Tensor | None = None


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


#: how many encoded conversations the encoder remembers (records that differ only by image tokenize alike)
MEMO_SIZE = 4096


class ConversationEncoder:
    """Tokenize conversations with a LLaVA processor (or a plain tokenizer) and mask the labels.

    Args:
        processor: a ``LlavaProcessor`` (or any processor with ``tokenizer``, ``image_processor``,
            ``image_token`` and a chat template), or a tokenizer (text only).
        max_length: truncate longer records to this many tokens (default: the tokenizer's
            ``model_max_length``).
        template: ``"auto"`` (the processor's chat template decides, :func:`detect_template`), a name
            of :data:`TEMPLATES` or a :class:`ConversationTemplate`.
        system: the system prompt of a template (``None``: the template's default, ``""``: none).

    Raises:
        ConfigError: an unknown template name, a template whose stop token is not one token of the
            tokenizer (``vicuna_v1`` on a tokenizer without ``</s>``), or ``auto`` with no chat template.
    """

    def __init__(self, processor: Any, max_length: int | None = None, template: str | ConversationTemplate = "auto",
                 system: str | None = None) -> None:
        from collections import OrderedDict

        from ..errors import ConfigError

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        owner = processor if getattr(processor, "chat_template", None) else self.tokenizer
        self._template_owner = owner
        if isinstance(template, str) and template != "auto" and template not in TEMPLATES:
            raise ConfigError(f"unknown conversation template {template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
        if template == "auto":
            if not getattr(owner, "chat_template", None):
                raise DataError("the processor/tokenizer has no chat template: set one (processor.chat_template = ...) "
                                f"or choose a conversation template ({', '.join(TEMPLATES)})")
            self.template, reason = detect_template(owner)
        else:
            self.template = TEMPLATES[template] if isinstance(template, str) else template
            reason = "chosen explicitly"
        self.template_name = self.template.name if self.template else "chat_template"
        self.system = system
        self.max_length = int(max_length or min(getattr(self.tokenizer, "model_max_length", 2048), 1 << 20))
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        self._image_tokens: int | None = None
        self._memo: OrderedDict[tuple, tuple[list[int], list[int]]] = OrderedDict()
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if self.template is not None and self.template.stop:
            stop = self.template.stop
            ids = self.tokenizer(stop, add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
                raise ConfigError(
                    f"conversation template {self.template.name} closes every answer with {stop!r}, which is not one token "
                    f"of this tokenizer (its eos is {self.tokenizer.eos_token!r}); choose the template the model was "
                    f"trained with ({', '.join(TEMPLATE_CHOICES)})")
            stops = [ids[0]] + [s for s in stops if s != ids[0]]
        #: the ids that end a generated answer (the template's stop token first, then the tokenizer's eos)
        self.stop_token_ids: list[int] = stops
        logger.info("conversation template: %s (%s)", self.template_name, reason)

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

    def _steps(self, record_id: str, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
        """``[(text so far, its new part supervised), ...]``: the conversation at each turn boundary."""
        if self.template is None:
            return [(self.render(messages[: k + 1], generation_prompt=m["role"] == "user"), m["role"] == "assistant")
                    for k, m in enumerate(messages)]
        steps, text = [], ""
        for piece, supervised in self.template.segments(record_id, messages, self.system):
            text += piece
            steps.append((text, supervised))
        return steps

    def render(self, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
        """The text of ``messages`` in the conversation format.

        With a template, a conversation ending with a human turn ends with the assistant header (the
        generation prompt); with the processor's chat template, ``generation_prompt`` asks for it.
        """
        if self.template is not None:
            return "".join(text for text, _ in self.template.segments("render", messages, self.system))
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
            self._remember(key, (self.tokenize(self.render(messages, generation_prompt=True)), []))
        return list(self._memo[key][0])

    def _remember(self, key: tuple, value: tuple[list[int], list[int]]) -> None:
        self._memo[key] = value
        if len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)

    # -- records -------------------------------------------------------------------------------
    def encode(self, record: Record) -> Encoded:
        """Ids and labels of ``record``; loss on every assistant turn (multi-turn included).

        Raises:
            DataError: the prefix tokens do not line up with the full tokens, the image
                placeholder count or place is wrong, or truncation leaves no assistant token.
        """
        messages = record.messages
        has_placeholder = _check_image_placement(record.id, messages) > 0
        if has_placeholder != record.has_image:
            what = "an <image> placeholder but no image" if has_placeholder else "an image but no <image> placeholder"
            raise _bad(record.id, f"has {what}")
        if has_placeholder and self.image_token is None:
            raise _bad(record.id, "has an image but the processor has no image token (text-only tokenizer)")
        key = tuple((m["role"], m["content"]) for m in messages)
        if key in self._memo:  # records that differ only by their image tokenize alike
            self._memo.move_to_end(key)
        else:
            self._remember(key, self._ids_and_labels(record.id, messages))
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
        for k, message in enumerate(messages):
            if message["role"] != ("user" if k % 2 == 0 else "assistant"):
                raise _bad(record_id, f"turns do not alternate user/assistant at turn {k}")
        if not messages or messages[-1]["role"] != "assistant":
            raise _bad(record_id, "does not end with an assistant turn")
        ids: list[int] = []
        labels: list[int] = []
        for k, (text, supervised) in enumerate(self._steps(record_id, messages)):
            full = self.tokenize(text)
            if full[: len(ids)] != ids:
                at = next((i for i, (a, b) in enumerate(zip(full, ids)) if a != b), len(full))
                raise _bad(record_id, f"label mask does not line up with its tokens at turn {k} (token {at}): the chat "
                           "template/tokenizer re-tokenizes across the turn boundary, so assistant tokens cannot be "
                           f"located; fix the template or the record text (conversation template: {self.template_name})")
            new = full[len(ids):]
            ids = full
            labels += list(new) if supervised else [IGNORE_INDEX] * len(new)
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
    report_bad_records(bad, skip_bad_records)
    n_trunc = sum(e.truncated for e in good)
    if n_trunc:
        logger.warning("%d record(s) longer than %d tokens were truncated (raise --model_max_length to keep them whole)",
                       n_trunc, encoder.max_length)
    if not good:
        raise DataError("the data set is empty (no usable record)")
    return good


def report_bad_records(bad: Sequence[DataError], skip_bad_records: bool) -> None:
    """Raise for ``bad`` records (up to five named, and the total) unless ``skip_bad_records``: then a warning."""
    if not bad:
        return
    listed = "\n  ".join(str(e) for e in bad[:5]) + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not skip_bad_records:
        raise DataError(f"{len(bad)} bad record(s); fix them or pass --skip_bad_records:\n  {listed}")
    logger.warning("skipping %d bad record(s) (--skip_bad_records):\n  %s", len(bad), listed)


class LlavaDataset:
    """The lazy training set (a map-style ``torch.utils.data.Dataset``): records in, one encoded record out.

    ``__getitem__`` decodes the record's image (from ``Record.image_path`` when it is not in memory),
    turns it into ``pixel_values`` with ``image_processor`` and tokenizes the conversation with the
    encoder; nothing is cached beyond the encoder's bounded memo, so memory does not grow with the data
    set and ``torch.utils.data.DataLoader(..., num_workers=N)`` decodes in parallel.

    Args:
        records: :class:`CompactRecords` (a LLaVA JSON/JSONL file) or a list of :class:`Record`.
        encoder: the :class:`ConversationEncoder`.
        image_processor: ``images -> {"pixel_values": [n, 3, H, W]}`` (default: the encoder's processor's).
        skip_bad_records: a record that fails when it is read (a corrupt image, a label mask that does
            not line up, no answer token left after truncation) is skipped with a warning (the next
            record is used) instead of stopping the run with its :class:`DataError`.
    """

    def __init__(self, records: Sequence[Record], encoder: ConversationEncoder, image_processor: Any = None,
                 skip_bad_records: bool = False) -> None:
        if not len(records):
            raise DataError("the data set is empty (no usable record)")
        self.records = records
        self.encoder = encoder
        self.image_processor = image_processor or getattr(encoder.processor, "image_processor", None)
        self.skip_bad_records = skip_bad_records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Encoded:
        for attempt in range(len(self)):
            index = (i + attempt) % len(self)
            try:
                return self.encode(self.records[index])
            except DataError as err:
                if not self.skip_bad_records:
                    raise
                logger.warning("skipping a bad record (--skip_bad_records): %s", err)
        raise DataError("the data set is empty (no usable record)")

    def encode(self, record: Record) -> Encoded:
        """``record`` encoded, its image decoded and processed into ``pixel_values``."""
        record = record.loaded()
        enc = self.encoder.encode(record)
        if record.image is not None:
            if self.image_processor is None:
                raise _bad(record.id, "has an image but there is no image processor")
            enc.pixel_values = self.image_processor([record.image], return_tensors="pt")["pixel_values"][0]
            enc.image = None
        return enc

    def modality_lengths(self) -> list[int]:
        """Words per record, negative for text-only records (see :func:`modality_grouped_order`)."""
        return modality_lengths(self.records)


def collate(
    rows: Sequence[Encoded], pad_token_id: int, pixel_values: Callable[[Sequence[Any]], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (+ ``pixel_values`` of the rows with an image).

    Args:
        rows: encoded records (a row's own ``pixel_values`` is used when it has them).
        pad_token_id: the tokenizer's pad id (labels are padded with ``IGNORE_INDEX``).
        pixel_values: images -> ``[n, 3, H, W]`` (e.g. ``processor.image_processor``); needed when a row
            has a PIL image and no ``pixel_values``.
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
    if any(r.pixel_values is not None for r in rows):
        batch["pixel_values"] = torch.stack([r.pixel_values for r in rows if r.pixel_values is not None])
        if any(r.image is not None for r in rows):
            raise DataError("collate: rows mix processed pixel_values and PIL images; encode them the same way")
        return batch
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
