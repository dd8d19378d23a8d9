"""mm_subspace.data.llava: LLaVA JSON records, label masking (assistant tokens only), bad input.

No model is needed: the tiny LLaVA processor (real CLIP BPE tokenizer + chat template) only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mm_subspace.data import llava as data
from mm_subspace.errors import DataError
from mm_subspace.tiny_models import IMAGE_TOKEN_ID, tiny_llava_processor


@pytest.fixture(scope="module")
def encoder() -> data.ConversationEncoder:
    return data.ConversationEncoder(tiny_llava_processor())


def _two_turn(image: object = None) -> data.Record:
    return data.Record("two-turn", [
        {"role": "user", "content": "<image>\nis the digit even? answer yes or no."},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": "and the digit plus one?"},
        {"role": "assistant", "content": "eight"},
    ], image=data.digit_image(7) if image is None else image)


def test_two_turn_mask_keeps_exactly_the_assistant_tokens(encoder: data.ConversationEncoder) -> None:
    enc = encoder.encode(_two_turn())
    tok = encoder.tokenizer
    assert len(enc.input_ids) == len(enc.labels)
    kept = [i for i, label in enumerate(enc.labels) if label != data.IGNORE_INDEX]
    assert all(enc.labels[i] == enc.input_ids[i] for i in kept)
    # the unmasked positions decode to the two answers, each closed by eos; nothing else
    assert tok.convert_ids_to_tokens([enc.input_ids[i] for i in kept]) == ["no</w>", "<end_of_text>", "eight</w>", "<end_of_text>"]
    spans = [[kept[0]]]
    for i in kept[1:]:
        spans[-1].append(i) if i == spans[-1][-1] + 1 else spans.append([i])
    assert [tok.decode([enc.input_ids[i] for i in s], skip_special_tokens=True) for s in spans] == ["no", "eight"]
    # image tokens (16 = (32/8)^2) and the prompts are all masked
    image_pos = [i for i, t in enumerate(enc.input_ids) if t == IMAGE_TOKEN_ID]
    assert len(image_pos) == 16 and all(enc.labels[i] == data.IGNORE_INDEX for i in image_pos)
    # the ids are exactly what the processor gives for the whole rendered conversation
    text = encoder.render(_two_turn().messages)
    ref = encoder.processor(text=text, images=data.digit_image(7), return_tensors="pt", add_special_tokens=False)
    assert ref["input_ids"][0].tolist() == enc.input_ids


def test_prompt_ids_end_with_the_generation_prompt(encoder: data.ConversationEncoder) -> None:
    rec = _two_turn()
    full = encoder.encode(rec)
    prompt = encoder.prompt_ids(rec.messages[:1])
    first_label = next(i for i, label in enumerate(full.labels) if label != data.IGNORE_INDEX)
    assert full.input_ids[:first_label] == prompt  # generation sees exactly the training prompt


def test_mask_that_does_not_line_up_is_an_error_naming_the_record() -> None:
    """LLaVA#1166: a template whose prefix renders differently from the full text (here it prints the
    number of messages) cannot locate the assistant tokens: an error, never a silent zero loss."""
    tok = tiny_llava_processor().tokenizer
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ messages | length }}: "
                         "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    enc = data.ConversationEncoder(tok)
    rec = data.Record("rec-7", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(DataError, match=r"record 'rec-7'.*does not line up"):
        enc.encode(rec)


def _write_dataset(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        data.digit_image(3).save(folder / name)
    path = folder / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_llava_json_loader_multi_turn_and_collate(tmp_path: Path, encoder: data.ConversationEncoder) -> None:
    records = [
        {"id": "m1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a three."},
            {"from": "human", "value": "is it odd?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "say hi"}, {"from": "gpt", "value": "hi"}]},
    ]
    path = _write_dataset(tmp_path, records)
    loaded = data.load_llava_json(path, tmp_path)
    assert [type(r) for r in loaded] == [data.Record, data.Record]
    assert loaded[0].image.size == (32, 32) and loaded[1].image is None
    enc = data.encode_records(encoder, loaded)
    tok = encoder.tokenizer
    kept = [t for t, label in zip(enc[0].input_ids, enc[0].labels) if label != data.IGNORE_INDEX]
    assert tok.decode(kept, skip_special_tokens=True).split() == ["a", "three", ".", "yes"]
    batch = data.collate(enc, tok.pad_token_id, lambda ims: encoder.processor.image_processor(ims, return_tensors="pt")["pixel_values"])
    n = max(len(e.input_ids) for e in enc)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)  # only the row with an image
    short = len(enc[1].input_ids)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (n - short)
    assert (batch["labels"][1, short:] == data.IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == tok.pad_token_id).all()


BAD = [
    ({"id": "r1", "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}]},
     r"record 'r1'.*<image> in its text but no 'image' field"),
    ({"id": "r2", "image": "a.png", "conversations": [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "x"}]},
     r"record 'r2'.*has an image \(a.png\) but no <image>"),
    ({"id": "r3", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                            {"from": "gpt", "value": "x"}]},
     r"record 'r3'.*missing.png does not exist"),
    ({"id": "r4", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
     r"record 'r4'.*turns do not alternate: turn 1"),
    ({"id": "r5", "conversations": [{"from": "gpt", "value": "x"}]}, r"record 'r5'.*turn 0 is from 'gpt'"),
    ({"id": "r6", "conversations": [{"from": "human", "value": "q"}]}, r"record 'r6'.*ends with a human turn"),
    ({"id": "r7", "conversations": []}, r"record 'r7'.*no 'conversations'"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[b[0]["id"] for b in BAD])
def test_bad_record_is_named_and_stops_before_training(tmp_path: Path, encoder: data.ConversationEncoder,
                                                        record: dict, message: str) -> None:
    good = {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = _write_dataset(tmp_path, [good, record])
    loaded = data.load_llava_json(path, tmp_path)
    with pytest.raises(DataError, match=message):
        data.encode_records(encoder, loaded)


def test_skip_bad_records_skips_with_a_count(tmp_path: Path, encoder: data.ConversationEncoder,
                                             caplog: pytest.LogCaptureFixture) -> None:
    good = {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = _write_dataset(tmp_path, [good] + [b[0] for b in BAD])
    with caplog.at_level(logging.WARNING):
        enc = data.encode_records(encoder, data.load_llava_json(path, tmp_path), skip_bad_records=True)
    assert [e.id for e in enc] == ["ok"]
    assert f"skipping {len(BAD)} bad record(s)" in caplog.text and "'r1'" in caplog.text


def test_empty_data_set_is_an_error(tmp_path: Path, encoder: data.ConversationEncoder) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        data.load_llava_json(path)
    bad_only = _write_dataset(tmp_path / "bad", [BAD[3][0]])
    with pytest.raises(DataError, match="the data set is empty"):
        data.encode_records(encoder, data.load_llava_json(bad_only), skip_bad_records=True)
    with pytest.raises(DataError, match="does not exist"):
        data.load_llava_json(tmp_path / "nope.json")


def test_long_text_is_truncated_with_a_warning_and_count(caplog: pytest.LogCaptureFixture) -> None:
    enc = data.ConversationEncoder(tiny_llava_processor(), max_length=30)
    long_answer = data.Record("long", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 40}])
    long_prompt = data.Record("long-prompt", [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "a"}])
    with caplog.at_level(logging.WARNING):
        ok = data.Record("short", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
        out = data.encode_records(enc, [long_answer, ok], skip_bad_records=False)
    assert len(out[0].input_ids) == 30 and out[0].truncated
    assert "1 record(s) longer than 30 tokens were truncated" in caplog.text
    with pytest.raises(DataError, match=r"record 'long-prompt'.*no assistant token to learn from after truncation"):
        enc.encode(long_prompt)
    short = data.ConversationEncoder(tiny_llava_processor(), max_length=10)
    with pytest.raises(DataError, match=r"record 'two-turn'.*would cut the image tokens"):
        short.encode(_two_turn())


def test_digits_tasks_split_and_scoring() -> None:
    train, test = data.digits_split()
    assert len(train) == 1347 and len(test) == 450 and not set(train) & set(test)
    recs = data.digits_instruction_records("test", limit=3)
    assert len(recs) == 3 * len(data.DIGIT_TASKS)
    by_task = {r.meta["task"]: r for r in recs[: len(data.DIGIT_TASKS)]}
    d = by_task["even"].meta["digit"]
    assert by_task["even"].messages[1]["content"] == ("yes" if d % 2 == 0 else "no")
    assert by_task["plus_one"].messages[1]["content"] == data.DIGIT_WORDS[d + 1]
    assert by_task["numeral"].messages[1]["content"] == str(d)
    # held out of pretraining: no task question is a caption prompt
    assert not {q for q, _ in data.DIGIT_TASKS.values()} & set(data.CAPTION_PROMPTS)
    assert data.exact_match(" Yes. ", "yes") and not data.exact_match("yes no", "yes")
    img = data.digit_image(0)
    assert img.size == (32, 32) and img.getpixel((0, 0)) == (255, 255, 255)  # white paper, dark ink
    with pytest.raises(DataError, match="unknown digits task"):
        data.digits_instruction_records("train", ["parity"])


def test_prompt_route_mask_is_the_prompt() -> None:
    from mm_subspace.methods.sulora import prompt_route_mask

    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, -100, 7, -100, -100, -100], [1, 2, 3, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    assert prompt_route_mask(mask, labels).tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
