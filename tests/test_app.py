"""apps/compare.py driven through gradio_client, the Gradio ecosystem's own client.

The app runs in a subprocess on 127.0.0.1 (free port) with pre-made adapters; see compare_app_server.py.
"""

from __future__ import annotations


import pytest

from compare_app_server import SDXL_NAMES, app_url  # tests/ is on sys.path (pytest's rootdir insertion)

gradio_client = pytest.importorskip("gradio_client")

SCALES = {"headers": ["adapter", "scale"], "data": [[n, 1.0] for n in SDXL_NAMES]}


@pytest.fixture(scope="module")
def client():
    return gradio_client.Client(app_url(), verbose=False)


def generate(client, prompt="a photo of sks cat", steps=2, size=32, adapters=SDXL_NAMES):
    return client.predict(prompt, "", 3, steps, 5.0, size, size, list(adapters), SCALES, True, api_name="/generate")


def test_two_adapters_give_two_labelled_images(client):
    from PIL import Image

    gallery, details, status = generate(client)
    assert [item["caption"] for item in gallery] == list(SDXL_NAMES)
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.size == (32, 32)
    rows = {row[0]: row for row in details["data"]}
    assert rows["lora"][1:4] == ["lora", 4, rows["lora"][3]] and rows["lora"][3] > 0  # method, rank, params
    assert rows["moslora"][1] == "moslora" and rows["moslora"][3] > rows["lora"][3]  # + mixers, + text encoders
    assert all(row[4] > 0 and row[5] == "batched" for row in details["data"])
    assert status.startswith("**Done:** 2 image(s)")


def test_bad_input_is_rejected_in_the_ui(client):
    for kwargs, message in (({"prompt": "  "}, "prompt is empty"), ({"steps": 100000}, "steps"),
                            ({"size": 100000}, "height"), ({"adapters": []}, "at least one adapter")):
        gallery, _, status = generate(client, **kwargs)
        assert gallery == [] and status.startswith("**Rejected:**") and message in status


def test_llava_tab_answers_per_adapter(client, tmp_path):
    from gradio_client import handle_file

    from mm_subspace.tiny_models import sample_photo

    target = tmp_path / "cat.png"
    sample_photo("chelsea", size=64).save(target)
    table, status = client.predict(handle_file(str(target)), "what animal is in the photo?", 4, ["base", "lora"],
                                   {"headers": ["adapter", "scale"], "data": [["lora", 1.0]]}, True, api_name="/answer")
    assert [row[0] for row in table["data"]] == ["base", "lora"] and status.startswith("**Done:** 2 answer(s)")
    assert table["data"][1][2:5] == ["lora", 4, table["data"][1][4]] and table["data"][1][4] > 0
