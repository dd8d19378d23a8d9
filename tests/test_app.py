"""apps/compare.py driven through gradio_client, the Gradio ecosystem's own client.

The app runs in a subprocess on 127.0.0.1 (free port) with pre-made adapters; see compare_app_server.py.
"""

from __future__ import annotations

import pytest

from compare_app_server import SDXL_NAMES, app_url, fresh_app_url  # tests/ is on sys.path (pytest's rootdir insertion)

gradio_client = pytest.importorskip("gradio_client")

SCALES = {"headers": ["adapter", "scale"], "data": [[n, 1.0] for n in SDXL_NAMES]}


@pytest.fixture(scope="module")
def client():
    return gradio_client.Client(app_url(), verbose=False)


API_PARAMETERS = ["prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width", "height",
                  "adapters", "scales", "batched"]


def generate(client, prompt="a photo of sks cat", steps=2, size=32, adapters=SDXL_NAMES, scales=SCALES):
    """/generate called by its parameter names, as docs/compare.md shows."""
    return client.predict(prompt=prompt, negative_prompt="", seed=3, num_inference_steps=steps, guidance_scale=5.0,
                          width=size, height=size, adapters=list(adapters), scales=scales, batched=True,
                          api_name="/generate")


def test_api_names_its_parameters_and_outputs(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    generate_api = api["/generate"]
    assert [p["parameter_name"] for p in generate_api["parameters"]] == API_PARAMETERS
    assert [r["label"] for r in generate_api["returns"]] == ["images", "details", "status"]
    assert [p["parameter_name"] for p in api["/answer"]["parameters"]] == [
        "image", "question", "max_new_tokens", "adapters", "scales", "batched"]
    assert [r["label"] for r in api["/answer"]["returns"]] == ["answers", "status"]


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


def _raw_generate(data: list) -> str:
    """POST to the app's HTTP API with a JSON body that may hold NaN (gradio_client refuses to send it); the status."""
    import json

    import httpx

    url = app_url().rstrip("/")
    body = json.dumps({"data": data}, allow_nan=True)
    event = httpx.post(f"{url}/gradio_api/call/generate", content=body, headers={"Content-Type": "application/json"},
                       timeout=60).json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/generate/{event}", timeout=120).text
    lines = [line[len("data: "):] for line in stream.splitlines() if line.startswith("data: ")]
    assert "event: complete" in stream, stream[-2000:]
    return json.loads(lines[-1])[2]


def test_nan_and_oversized_requests_get_our_rejected_message(client):
    """NaN in an integer field reaches our checks (not Gradio's generic error); an over-long prompt is capped;
    a request over the time budget is refused with its numbers before it runs."""
    for kwargs, message in (({"prompt": "cat " * 1000}, "characters long; at most 2,000"),
                            ({"steps": 150, "size": 2048}, "the budget is")):
        gallery, _, status = generate(client, **kwargs)
        assert gallery == [] and status.startswith("**Rejected:**") and message in status, status
    nan = float("nan")
    for position, message in ((2, "seed must be a whole number"), (3, "steps must be a finite number"),
                              (5, "width must be a finite number")):
        data = ["a photo of sks cat", "", 3, 2, 5.0, 32, 32, list(SDXL_NAMES), SCALES, True]
        data[position] = nan
        status = _raw_generate(data)
        assert status.startswith("**Rejected:** " + message), status


def test_integer_fields_pass_nan_through_to_our_checks():
    import gradio as gr

    from mm_subspace.apps import compare
    from mm_subspace.pipelines import SDXLAdapters
    from mm_subspace.tiny_models import tiny_sdxl_path

    sd = SDXLAdapters.from_pretrained(tiny_sdxl_path(pretrained=False))
    demo = compare.build_ui(lambda: (sd, None, []), [], 32, llava_tab=False)
    numbers = [block for block in demo.blocks.values() if isinstance(block, gr.Number)]
    assert len(numbers) == 5 and all(block.precision is None for block in numbers)  # no int() of a NaN in Gradio
    assert numbers[0].preprocess(float("nan")) != numbers[0].preprocess(float("nan"))  # NaN arrives as NaN
    gallery, _, status = compare.run_generate(sd, "cat", "", 0, float("nan"), 5.0, 32, 32, ["base"], [], True)
    assert gallery == [] and status == "**Rejected:** steps must be a finite number, got nan"


def test_fresh_install_serves_the_shipped_demo_adapters():
    """An empty adapters folder: the app trains nothing and serves lora and moslora of the held-out 9 (and two
    LLaVA demo adapters); the trained moslora turns "sks" into a 9 the base does not draw."""
    from PIL import Image

    from mm_subspace.eval.digits import digit_classifier

    client = gradio_client.Client(fresh_app_url(), verbose=False)
    names = ["base", "lora", "moslora"]
    gallery, details, status = generate(client, prompt="a handwritten digit sks", steps=20, adapters=names,
                                        scales={"headers": ["adapter", "scale"], "data": [["lora", 1.0], ["moslora", 1.0]]})
    assert status.startswith("**Done:** 3 image(s)") and [item["caption"] for item in gallery] == names
    reads = {}
    for item in gallery:
        with Image.open(item["image"]) as image:
            reads[item["caption"]] = int(digit_classifier().predict([image.convert("RGB")])[0])
    assert reads["moslora"] == 9 and reads["base"] != 9, reads
    rows = {row[0]: row for row in details["data"]}
    assert rows["lora"][1] == "lora" and rows["moslora"][1] == "moslora"
    table, status = client.predict(image=None, question="is the digit even? answer yes or no.", max_new_tokens=4,
                                   adapters=["lora", "moslora"], scales={"headers": ["adapter", "scale"], "data": []},
                                   batched=True, api_name="/answer")
    assert [row[0] for row in table["data"]] == ["lora", "moslora"] and status.startswith("**Done:** 2 answer(s)")
