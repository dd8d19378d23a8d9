"""Tokenizers from the real CLIP BPE vocabulary bundled with ``open_clip`` (offline): CLIP's and the tiny LM's.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from .cache import cached

# CLIP BPE vocabulary: 256 bytes + 256 bytes with "</w>" + 48,894 merges + 2 specials.
CLIP_VOCAB_SIZE = 49408


CLIP_MERGES = 49152 - 256 - 2  # number of merges CLIP uses from the bundled file


BOS_TOKEN = "<start_of_text>"  # id 49406


EOS_TOKEN = "<end_of_text>"  # id 49407


# Extra tokens of the causal-LM tokenizer, appended after the CLIP vocabulary.
IMAGE_TOKEN = "<image>"


IMAGE_TOKEN_ID = 49408


PAD_TOKEN = "<pad>"


PAD_TOKEN_ID = 49409


LM_VOCAB_SIZE = 49472  # CLIP vocab + extra tokens, rounded up to a multiple of 64


LM_MAX_LENGTH = 1024


# Simple LLaVA-1.5-style template; bos comes from the template, so tokenize the rendered
# prompt with ``add_special_tokens=False``. Assistant turns end with eos (for training).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# Versioned cache folder names: bump when the corresponding builder changes.
CLIP_TOKENIZER_NAME = "clip-tokenizer-v1"


LM_TOKENIZER_NAME = "lm-tokenizer-v1"


def _bpe_file() -> Path:
    """Path of open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the CLIP BPE vocabulary ships with open_clip; install it with "
            "`pip install open_clip_torch`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode map (same order as open_clip)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49,408-entry CLIP vocabulary and its 48,894 merges, as open_clip builds them."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer_files() -> Path:
    """Folder with the real CLIP ``vocab.json`` + ``merges.txt`` (from open_clip's BPE file).

    The folder also holds a saved ``CLIPTokenizer`` (``CLIPTokenizer.from_pretrained`` works).
    """

    def build(folder: Path) -> None:
        vocab, merges = _clip_vocab_and_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merge_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
        (folder / "merges.txt").write_text(merge_text, encoding="utf-8")
        clip_tokenizer_from_files(folder).save_pretrained(folder)

    return cached(CLIP_TOKENIZER_NAME, build)


def clip_tokenizer_from_files(folder: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=77,  # without it the SDXL pipeline overflows
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP tokenizer (bos 49406, eos/pad/unk 49407, ``model_max_length`` 77)."""
    return clip_tokenizer_from_files(clip_tokenizer_files())


def _build_lm_tokenizer() -> PreTrainedTokenizerFast:
    """Causal-LM tokenizer on the CLIP BPE vocabulary: bos prepended, no eos appended."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _clip_vocab_and_merges()
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    )
    # Same normaliser / pre-tokeniser as transformers' CLIPTokenizer (lower-cased, no spaces).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # ByteLevel joins the tokens into one string; "</w>" marks word ends -> spaces.
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
    )
    tok.add_special_tokens(
        [
            AddedToken(IMAGE_TOKEN, special=True, normalized=False),
            AddedToken(PAD_TOKEN, special=True, normalized=False),
        ]
    )
    assert tok.token_to_id(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    assert tok.token_to_id(PAD_TOKEN) == PAD_TOKEN_ID
    bos_id = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=LM_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


def lm_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny LLaMA/LLaVA tokenizer: CLIP BPE + ``<image>`` (49408) + ``<pad>`` (49409).

    Prepends bos (``<start_of_text>``, 49406), never appends eos (``<end_of_text>``, 49407);
    has a simple ``USER: ... ASSISTANT:`` chat template. Lower-cases like CLIP.
    """
    from transformers import AutoTokenizer

    path = cached(LM_TOKENIZER_NAME, lambda folder: _build_lm_tokenizer().save_pretrained(folder))
    return AutoTokenizer.from_pretrained(path)
