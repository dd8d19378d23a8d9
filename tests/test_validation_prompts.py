"""--validation_prompts_file: kohya's sample-prompt lines parsed into prompts with their options, errors naming the line."""

from __future__ import annotations

import pytest

from mm_subspace.training.validation_prompts import ValidationPrompt, parse_validation_prompts, read_validation_prompts

TEXT = """# validation prompts
a handwritten digit sks

a photo of sks cat on a sofa --n blurry, low quality --d 7 --l 6.5 --s 30 --w 64 --h 48
  a handwritten digit sks --d 0
"""


def test_lines_parse_into_prompts_with_kohya_options():
    assert parse_validation_prompts(TEXT, "p.txt") == [
        ValidationPrompt("a handwritten digit sks", line=2),
        ValidationPrompt("a photo of sks cat on a sofa", negative_prompt="blurry, low quality", seed=7, guidance_scale=6.5,
                         num_inference_steps=30, width=64, height=48, line=4),
        ValidationPrompt("a handwritten digit sks", seed=0, line=5),
    ]


@pytest.mark.parametrize(("line", "message"), [
    ("a dog --x 3", r"p.txt, line 1: unknown option --x; the options are --n negative prompt, --d seed"),
    ("a dog --d three", r"line 1: --d \(seed\) must be a whole number, got 'three'"),
    ("a dog --s 0", r"--s \(denoising steps\) must be > 0"),
    ("a dog --l", r"--l needs a value \(guidance scale\)"),
    ("a dog --d 1 --d 2", r"--d \(seed\) is given twice"),
    ("--d 3", r"the line has options but no prompt"),
    ("# only a comment\n\n", r"holds no prompt"),
])
def test_bad_lines_are_errors_naming_file_line_and_fix(line, message):
    with pytest.raises(ValueError, match=message):
        parse_validation_prompts(line, "p.txt")


def test_read_file_with_bom_and_missing_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeffa handwritten digit sks --d 3\n", encoding="utf-8")
    assert read_validation_prompts(path) == [ValidationPrompt("a handwritten digit sks", seed=3, line=1)]
    with pytest.raises(ValueError, match="no such file"):
        read_validation_prompts(tmp_path / "missing.txt")
