"""``--validation_prompts_file``: one validation prompt per line, with kohya's sample-prompt options.

    # comments and blank lines are skipped
    a handwritten digit sks
    a handwritten digit sks --d 3 --s 30
    a photo of sks cat on a sofa --n blurry, low quality --d 7 --l 6.5 --w 512 --h 512

Options (kohya-ss ``sd-scripts``' ``--sample_prompts`` syntax): ``--n`` negative prompt, ``--d`` seed, ``--s``
denoising steps, ``--l`` guidance scale, ``--w`` / ``--h`` width / height. An option left out takes the script's
value (``--seed`` + line number, ``--validation_inference_steps``, the pipeline's guidance, ``--resolution``).
Every problem is an error naming the file, the line and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OPTIONS", "ValidationPrompt", "parse_validation_prompts", "read_validation_prompts"]

#: option letter -> (field, type, meaning)
OPTIONS = {
    "n": ("negative_prompt", str, "negative prompt"),
    "d": ("seed", int, "seed"),
    "s": ("num_inference_steps", int, "denoising steps"),
    "l": ("guidance_scale", float, "guidance scale"),
    "w": ("width", int, "width"),
    "h": ("height", int, "height"),
}
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z_]+)(?=\s|$)")


@dataclass(frozen=True)
class ValidationPrompt:
    """One line of a prompts file; ``None`` fields take the script's defaults."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    line: int = 0


def _parse_line(text: str, where: str, line: int) -> ValidationPrompt:
    marks = list(_OPTION.finditer(text))
    prompt = text[: marks[0].start()].strip() if marks else text.strip()
    if not prompt:
        raise ValueError(f"{where}: the line has options but no prompt before them ({text.strip()!r})")
    values: dict[str, object] = {}
    for i, mark in enumerate(marks):
        letter = mark.group(1)
        value = text[mark.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)].strip()
        if letter not in OPTIONS:
            known = ", ".join(f"--{k} {meaning}" for k, (_, _, meaning) in OPTIONS.items())
            raise ValueError(f"{where}: unknown option --{letter}; the options are {known}")
        field, kind, meaning = OPTIONS[letter]
        if field in values:
            raise ValueError(f"{where}: --{letter} ({meaning}) is given twice")
        if not value:
            raise ValueError(f"{where}: --{letter} needs a value ({meaning})")
        try:
            parsed = kind(value)
        except ValueError:
            raise ValueError(f"{where}: --{letter} ({meaning}) must be {'a whole number' if kind is int else 'a number'}, "
                             f"got {value!r}") from None
        if field != "negative_prompt" and (parsed < 0 or (parsed == 0 and field != "seed")):
            raise ValueError(f"{where}: --{letter} ({meaning}) must be {'>= 0' if field == 'seed' else '> 0'}, got {value}")
        values[field] = parsed
    return ValidationPrompt(prompt=prompt, line=line, **values)  # type: ignore[arg-type]


def parse_validation_prompts(text: str, source: str = "<prompts>") -> list[ValidationPrompt]:
    """The prompts of a prompts file's ``text`` (see the module docstring); ``source`` names it in errors.

    Raises:
        ValueError: an unknown or repeated option, a value of the wrong type, a line with options but no prompt,
            or no prompt at all.
    """
    prompts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip() and not raw.lstrip().startswith("#"):
            prompts.append(_parse_line(raw, f"{source}, line {number}", number))
    if not prompts:
        raise ValueError(f"{source} holds no prompt (one per line; blank lines and # comments are skipped)")
    return prompts


def read_validation_prompts(path: str | os.PathLike[str]) -> list[ValidationPrompt]:
    """:func:`parse_validation_prompts` of a UTF-8 file (a BOM is accepted)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"--validation_prompts_file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--validation_prompts_file {path} is unreadable ({err}); save it as UTF-8 text") from None
    return parse_validation_prompts(text, str(path))
