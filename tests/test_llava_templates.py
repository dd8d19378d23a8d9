"""mm_subspace.data.llava conversation templates with a real LLaMA-style (SentencePiece) tokenizer, and the
lazy data set: label masks token by token against LLaVA's ``preprocess_v1``, the templates' stop tokens,
refusals, length-grouped order, and bounded memory on 20,000 records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mm_subspace.data import llava as data
from mm_subspace.errors import ConfigError, DataError
from mm_subspace.tiny_models import tiny_llava_processor

IGNORE = data.IGNORE_INDEX


@pytest.fixture(scope="module")
def processor(llama_llava_processor_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llama_llava_processor_dir)


@pytest.fixture(scope="module")
def encoder(processor) -> data.ConversationEncoder:
    return data.ConversationEncoder(processor)


def preprocess_v1(tokenizer, source: list[dict[str, str]], system: str = data.VICUNA_SYSTEM) -> tuple[list[int], list[int]]:
    """LLaVA's ``llava/train/train.py::preprocess_v1`` (with ``preprocess_multimodal``) for one record, the
    llava-hf way: ``<image>`` is one token of the tokenizer. Written from LLaVA's code: the conversation
    from ``conv_vicuna_v1.get_prompt()``, tokenized whole; the mask from the lengths of each round tokenized
    alone (one token less after the first round for a non-legacy tokenizer)."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    conversation = system + seps[0]
    for i, sentence in enumerate(source):
        value = sentence["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        conversation += roles[sentence["from"]] + ": " + value + seps[i % 2]
    input_ids = tokenizer(conversation).input_ids
    target = list(input_ids)
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = [IGNORE]
    for i, rou in enumerate(conversation.split(seps[1])):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer(rou).input_ids)
        instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        if i != 0 and not tokenizer.legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur_len:cur_len + instruction_len] = [IGNORE] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE] * (len(target) - cur_len)
    assert cur_len == len(input_ids), f"preprocess_v1: tokenization mismatch {cur_len} vs {len(input_ids)}"
    return input_ids, target


def _record(source: list[dict[str, str]], rid: str = "r") -> data.Record:
    from PIL import Image

    has_image = any("<image>" in s["value"] for s in source)
    messages = [{"role": "user" if s["from"] == "human" else "assistant", "content": s["value"]} for s in source]
    return data.Record(rid, messages, Image.new("RGB", (32, 32), (255, 255, 255)) if has_image else None)


def _one_image_token(enc: data.Encoded, image_token_id: int) -> tuple[list[int], list[int]]:
    """The encoded record with its run of image tokens collapsed to one (as LLaVA's ids before the model)."""
    ids, labels = [], []
    for t, label in zip(enc.input_ids, enc.labels):
        if not (t == image_token_id and ids and ids[-1] == image_token_id):
            ids.append(t)
            labels.append(label)
    return ids, labels


SOURCES = {
    "single-turn": [{"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": "a white square."}],
    "multi-turn, <image> not at the start": [
        {"from": "human", "value": "what is in the image?\n<image>"}, {"from": "gpt", "value": "a white square."},
        {"from": "human", "value": "is seven even?"}, {"from": "gpt", "value": "no, seven is not even."}],
    "text-only multi-turn (ShareGPT)": [
        {"from": "human", "value": "is seven even?"}, {"from": "gpt", "value": "no."},
        {"from": "human", "value": "and eight?"}, {"from": "gpt", "value": "yes, eight is even."},
        {"from": "human", "value": "what comes after eight?"}, {"from": "gpt", "value": "nine"}],
    "non-ASCII answer (byte fallback)": [{"from": "human", "value": "<image>\ndescribe the image."},
                                         {"from": "gpt", "value": "un carré blanc — 7 €."}],
}


def test_the_fixture_tokenizer_is_llama_style(processor) -> None:
    tok = processor.tokenizer
    assert type(tok).__name__ == "LlamaTokenizer" and tok.legacy is False
    assert tok.convert_ids_to_tokens(tok("a white square.").input_ids) == ["<s>", "▁a", "▁white", "▁square", "."]
    assert tok.convert_ids_to_tokens(tok("€").input_ids) == ["<s>", "▁", "<0xE2>", "<0x82>", "<0xAC>"]  # byte fallback
    after_eos = tok("no.</s>USER: x").input_ids
    assert tok.convert_ids_to_tokens(after_eos)[3:5] == ["</s>", "USER"]
    assert tok.convert_ids_to_tokens(tok("USER: x").input_ids)[:3] == ["<s>", "▁", "USER"]


def test_auto_chooses_vicuna_v1_for_the_llava_hf_template(encoder: data.ConversationEncoder,
                                                           caplog: pytest.LogCaptureFixture, processor) -> None:
    assert encoder.template_name == "vicuna_v1"
    assert encoder.stop_token_ids == [processor.tokenizer.convert_tokens_to_ids("</s>")]
    with caplog.at_level(logging.INFO, logger="mm_subspace.data.llava"):
        data.ConversationEncoder(processor)
    assert "conversation template: vicuna_v1" in caplog.text and "USER: … ASSISTANT:" in caplog.text
    # the tiny model's own template is no known format: it is used as it is
    assert data.ConversationEncoder(tiny_llava_processor()).template_name == "chat_template"


@pytest.mark.parametrize("name", list(SOURCES))
def test_vicuna_v1_mask_equals_llava_preprocess_v1_token_by_token(encoder: data.ConversationEncoder, processor,
                                                                  name: str) -> None:
    source = SOURCES[name]
    ref_ids, ref_labels = preprocess_v1(processor.tokenizer, source)
    enc = encoder.encode(_record(source))
    ids, labels = _one_image_token(enc, encoder.image_token_id)
    assert ids == ref_ids
    assert labels == ref_labels
    # and what is supervised is every answer with its </s>, nothing else
    tok = processor.tokenizer
    answers = [s["value"] for s in source if s["from"] == "gpt"]
    kept = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert [tok.decode(s).strip() for s in _spans(ids, labels)] == [a + "</s>" for a in answers]
    assert sum(t == tok.eos_token_id for t in kept) == len(answers)
    assert all(tok.convert_ids_to_tokens(span)[-2:][0] != "▁" for span in _spans(ids, labels))  # no stray space token


def _spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE:
            continue
        if spans and labels[i - 1] != IGNORE:
            spans[-1].append(ids[i])
        else:
            spans.append([ids[i]])
    return spans


def test_generation_prompt_is_the_training_prefix(encoder: data.ConversationEncoder, processor) -> None:
    rec = _record(SOURCES["multi-turn, <image> not at the start"])
    enc = encoder.encode(rec)
    first = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    assert encoder.prompt_ids(rec.messages[:1]) == enc.input_ids[:first]
    assert processor.tokenizer.convert_ids_to_tokens(enc.input_ids[first - 2:first]) == ["▁ASSISTANT", ":"]
    second = next(i for i in range(len(enc.labels) - 1, 0, -1) if enc.labels[i] == IGNORE) + 1
    assert encoder.prompt_ids(rec.messages[:3]) == enc.input_ids[:second]


def test_system_prompt_is_optional(processor) -> None:
    source = SOURCES["single-turn"]
    bare = data.ConversationEncoder(processor, template="vicuna_v1", system="")
    enc = bare.encode(_record(source))
    assert _one_image_token(enc, bare.image_token_id) == preprocess_v1(processor.tokenizer, source, system="")
    assert processor.tokenizer.convert_ids_to_tokens(enc.input_ids[:3]) == ["<s>", "▁", "USER"]
    assert bare.render(_record(source).messages[:1]) == "USER: <image>\nwhat is in the image? ASSISTANT:"
    own = data.ConversationEncoder(processor, template="vicuna_v1", system="You answer in one line.")
    assert own.render(_record(source).messages[:1]).startswith("You answer in one line. USER: <image>\n")


def test_image_in_a_gpt_turn_is_refused_naming_the_record(tmp_path: Path, encoder: data.ConversationEncoder) -> None:
    data.digit_image(3).save(tmp_path / "a.png")
    item = {"id": "leak-1", "image": "a.png", "conversations": [
        {"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "<image>\na three."}]}
    with pytest.raises(DataError, match=r"record 'leak-1'.*<image> in turn 1, a gpt turn"):
        data.parse_record(item, 0, image_folder=tmp_path)
    rec = data.Record("leak-2", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image> a"}],
                      data.digit_image(3))
    with pytest.raises(DataError, match=r"record 'leak-2'.*a gpt turn"):
        encoder.encode(rec)


def test_vicuna_on_a_tokenizer_without_eos_s_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"vicuna_v1 closes every answer with '</s>'.*not one token"):
        data.ConversationEncoder(tiny_llava_processor(), template="vicuna_v1")
    with pytest.raises(ConfigError, match="unknown conversation template 'chatml'"):
        data.ConversationEncoder(tiny_llava_processor(), template="chatml")


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_llama3_chat_supervises_each_answer_and_eot(processor) -> None:
    import copy

    llama3 = copy.deepcopy(processor)
    tok = llama3.tokenizer
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    enc = data.ConversationEncoder(llama3, template="llama3_chat", system="be brief.")
    assert enc.stop_token_ids[0] == tok.convert_tokens_to_ids("<|eot_id|>")
    source = SOURCES["multi-turn, <image> not at the start"]
    out = enc.encode(_record(source))
    spans = [tok.decode(s) for s in _spans(out.input_ids, out.labels)]
    assert spans == ["a white square.<|eot_id|>", "no, seven is not even.<|eot_id|>"]
    text = enc.render(_record(source).messages[:1])
    assert text == ("<|start_header_id|>system<|end_header_id|>\n\nbe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat is in the image?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                         "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}<|eot_id|>{% endfor %}"
                         "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    llama3.chat_template = tok.chat_template
    assert data.ConversationEncoder(llama3).template_name == "llama3_chat"


def test_plain_template_is_llava_pretraining(processor) -> None:
    enc = data.ConversationEncoder(processor, template="plain")
    tok = processor.tokenizer
    source = [{"from": "human", "value": "describe the image.\n<image>"}, {"from": "gpt", "value": "a white square."}]
    out = enc.encode(_record(source))
    n_image = enc.image_token_count()
    assert out.input_ids[: 1 + n_image] == [tok.bos_token_id] + [enc.image_token_id] * n_image  # the question is dropped
    assert all(label == IGNORE for label in out.labels[: 1 + n_image])
    assert tok.decode([t for t, label in zip(out.input_ids, out.labels) if label != IGNORE]) == "a white square.\n"
    with pytest.raises(DataError, match=r"record 'r'.*plain template.*one human turn"):
        enc.encode(_record(SOURCES["multi-turn, <image> not at the start"]))
    with pytest.raises(DataError, match=r"no image in its first turn"):
        enc.encode(_record([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]))


def test_modality_grouped_order_keeps_batches_single_modality() -> None:
    lengths = [(-1) ** i * (1 + (i * 7) % 23) for i in range(103)]  # 52 with an image, 51 text-only
    batch, world = 4, 2
    order = data.modality_grouped_order(lengths, batch, world, seed=3)
    assert sorted(order) == list(range(103))
    assert order == data.modality_grouped_order(lengths, batch, world, seed=3)
    assert order != data.modality_grouped_order(lengths, batch, world, seed=4)
    mega = batch * world
    full = len(order) - len(order) % mega - mega  # the last mega-batch of each modality is the mixed tail
    for start in range(0, full, batch):
        signs = {lengths[i] > 0 for i in order[start:start + batch]}
        assert len(signs) == 1, order[start:start + batch]
    for start in range(0, full, mega):  # within a mega-batch: longest first, rank r's batch = chunk[r::world]
        chunk = order[start:start + mega]
        assert [abs(lengths[i]) for i in chunk[:batch]] == sorted((abs(lengths[i]) for i in chunk[:batch]), reverse=True)


def _write_665k_like(folder: Path, n: int, n_images: int = 4, size: int = 96) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "coco").mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "coco" / f"{k}.png")
    records = []
    for i in range(n):
        if i % 5 == 4:  # ShareGPT-style text-only conversation
            records.append({"id": f"sg-{i}", "conversations": [
                {"from": "human", "value": "is seven even?"}, {"from": "gpt", "value": "no."},
                {"from": "human", "value": "and eight?"}, {"from": "gpt", "value": f"yes, eight is even ({i})."}]})
        else:
            records.append({"id": f"{i:012d}", "image": f"coco/{i % n_images}.png", "conversations": [
                {"from": "human", "value": "what is in the image?\n<image>" if i % 2 else "<image>\nwhat is in the image?"},
                {"from": "gpt", "value": f"a white square ({i})."}]})
    path = folder / "llava_v1_5_mix665k_like.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_lazy_dataset_equals_the_eager_encoding(tmp_path: Path, encoder: data.ConversationEncoder, processor) -> None:
    path = _write_665k_like(tmp_path, 10)
    lazy = data.CompactRecords(path, tmp_path)
    assert len(lazy) == 10 and not lazy.bad and lazy[0].image is None and lazy[0].image_path == (tmp_path / "coco/0.png").resolve()
    dataset = data.LlavaDataset(lazy, encoder)
    eager = data.encode_records(encoder, data.load_llava_json(path, tmp_path))
    pixels = processor.image_processor
    for i in range(10):
        row = dataset[i]
        assert (row.id, row.input_ids, row.labels) == (eager[i].id, eager[i].input_ids, eager[i].labels)
        if eager[i].image is None:
            assert row.pixel_values is None
        else:
            assert torch.equal(row.pixel_values, pixels([eager[i].image], return_tensors="pt")["pixel_values"][0])
    batch = data.collate([dataset[i] for i in range(5)], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["input_ids"].shape[0] == 5
    assert lazy.modality_lengths()[:5] == [10, 10, 10, 10, -11]  # words (LLaVA counts split()), negative: text-only


def test_lazy_dataset_collects_bad_records_and_fails_lazily_on_a_corrupt_image(
        tmp_path: Path, encoder: data.ConversationEncoder, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_665k_like(tmp_path, 6)
    records = json.loads(path.read_text())
    records.append({"id": "no-file", "image": "coco/missing.png", "conversations": records[0]["conversations"]})
    path.write_text(json.dumps(records))
    lazy = data.CompactRecords(path, tmp_path)
    assert len(lazy) == 6 and len(lazy.bad) == 1 and "'no-file'" in str(lazy.bad[0])
    (tmp_path / "coco" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"record '000000000001'"):
        data.LlavaDataset(lazy, encoder)[1]
    with caplog.at_level(logging.WARNING):
        row = data.LlavaDataset(lazy, encoder, skip_bad_records=True)[1]
    assert row.id == "000000000002" and "skipping a bad record" in caplog.text


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_lazy_dataset_memory_is_bounded_on_20000_records(tmp_path: Path, encoder: data.ConversationEncoder) -> None:
    """20,000 records (665K-shaped: images and text-only conversations) indexed and read through a DataLoader:
    resident memory grows by far less than holding their images would (20,000 x 96x96 RGB = 553 MB decoded)."""
    import gc

    path = _write_665k_like(tmp_path, 20_000)
    gc.collect()
    before = _rss_mb()
    lazy = data.CompactRecords(path, tmp_path)
    dataset = data.LlavaDataset(lazy, encoder)
    indexed = _rss_mb()
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=0,
                                         sampler=range(0, len(dataset), 10),  # 2,000 records across the whole file
                                         collate_fn=lambda rows: data.collate(rows, encoder.tokenizer.pad_token_id))
    seen = sum(int(b["input_ids"].shape[0]) for b in loader)
    gc.collect()
    after = _rss_mb()
    assert len(lazy) == 20_000 and seen == 2_000
    assert indexed - before < 100, f"indexing 20,000 records took {indexed - before:.0f} MB"
    assert after - before < 200, f"resident memory grew by {after - before:.0f} MB"


def test_modality_grouped_indices_walk_each_epoch_once_across_ranks() -> None:
    lengths = [(-1) ** (i // 3) * (1 + i % 11) for i in range(48)]
    batch, world = 3, 2
    steps = 48 // (batch * world)
    for epoch in range(2):
        seen = [i for step in range(epoch * steps, (epoch + 1) * steps) for rank in range(world)
                for i in data.modality_grouped_indices(lengths, batch, step, rank, world, seed=5)]
        assert seen == data.modality_grouped_order(lengths, batch, world, seed=5 + epoch)  # a function of the step only
    assert data.modality_grouped_indices(lengths, batch, 3, 1, world, seed=5) == \
        data.modality_grouped_order(lengths, batch, world, seed=5)[3 * 6 + 3:3 * 6 + 6]


@pytest.mark.parametrize("text, message", [
    ('[{"id": "a"}] x', r"line 1: not valid JSON \(text after the closing"),
    ('[{"id": "a"},\n]', r"line 2: not valid JSON"),
    ('[{"id": "a"}\n{"id": "b"}]', r"line 2: not valid JSON \(expected ',' or '\]'\)"),
])
def test_json_list_read_record_by_record_names_the_line_of_bad_syntax(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        list(data.iter_llava_json(path))
