"""mm_subspace.training_utils: checkpoints (atomic, rotated, resumable, our adapter format), NaN location,
param groups, fp32 casting, deterministic step randomness, image grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mm_subspace as mms
from conftest import adapted, checkpointing_on
from mm_subspace.errors import AdapterFileError, ConfigError, NonFiniteError
from mm_subspace.training_utils import (
    CheckpointManager,
    LossHistory,
    adapters_digest,
    cast_trainable_params,
    check_finite,
    curve_smoothing,
    ema,
    image_grid,
    locate_nonfinite,
    param_groups,
    save_image_grid,
    save_loss_curve,
    step_generator,
)


def tiny(method: str = "moslora", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return mms.inject(model, mms.config_for(method, rank=2, targets=["0", "2"], init_weights=False))


def test_checkpoints_are_atomic_rotated_and_restore_adapters_exactly(tmp_path: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny()
    history = LossHistory()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    manager = CheckpointManager(tmp_path, "moslora", total_limit=2)
    manager.register_hooks(accelerator, {"net": model})
    manager.history = history  # JSON in trainer_state.json, never pickled
    model, optimizer = accelerator.prepare(model, optimizer)
    digests = {}
    for step in (1, 2, 3):
        model(torch.randn(3, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(step, loss=float(step))
        manager.save(accelerator, step)
        digests[step] = adapters_digest({"net": model})
    (manager.root / ".checkpoint-4.tmp").mkdir()  # a save killed half-way
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-2", "checkpoint-3"]
    latest = manager.resolve("latest")
    assert latest.name == "checkpoint-3"
    # the checkpoint holds our adapter format, not a pickled model
    meta = json.loads((latest / "net" / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "moslora" and not list(latest.glob("model*.safetensors"))

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    history.rows.clear()
    assert manager.check_resumable(manager.resolve("checkpoint-2"), ["net"]) == 2
    path, state = manager.find_resumable("checkpoint-2", ["net"])
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    manager.restore(state)
    assert adapters_digest({"net": model}) == digests[2]
    assert [r["step"] for r in history.rows] == [1, 2]

    with pytest.raises(ConfigError, match="belongs to a --adapter moslora run, not lora"):
        CheckpointManager(tmp_path, "lora").check_resumable(latest, ["net"])
    with pytest.raises(ConfigError, match=r"has no adapter for \['text_encoder'\]"):
        manager.check_resumable(latest, ["net", "text_encoder"])
    with pytest.raises(FileNotFoundError, match="checkpoint-2, checkpoint-3"):
        manager.resolve("checkpoint-9")
    assert CheckpointManager(tmp_path / "fresh", "moslora").resolve("latest") is None


def test_checkpoints_go_to_output_dir_like_diffusers_and_the_old_layout_still_resumes(tmp_path: Path) -> None:
    """New checkpoints: <output_dir>/checkpoint-N (diffusers' layout); <output_dir>/training_state/checkpoint-N of an
    older run are still listed, resolved by name and by ``latest``, resumed exactly and rotated."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    manager = CheckpointManager(tmp_path, "moslora", total_limit=2)
    manager.register_hooks(accelerator, {"net": model})
    model, optimizer = accelerator.prepare(model, optimizer)
    digests = {}
    for step in (1, 2):
        model(torch.randn(3, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert manager.save(accelerator, step) == tmp_path / f"checkpoint-{step}"
        digests[step] = adapters_digest({"net": model})
    (tmp_path / "training_state").mkdir()
    (tmp_path / "checkpoint-1").rename(tmp_path / "training_state" / "checkpoint-1")  # as an older run left it
    assert manager.checkpoints() == [tmp_path / "training_state" / "checkpoint-1", tmp_path / "checkpoint-2"]
    old = manager.resolve("checkpoint-1")
    assert old == tmp_path / "training_state" / "checkpoint-1" and manager.check_resumable(old, ["net"]) == 1
    accelerator.load_state(str(old))
    assert adapters_digest({"net": model}) == digests[1]
    (tmp_path / "checkpoint-2").rename(tmp_path / "training_state" / "checkpoint-2")
    assert manager.resolve("latest") == tmp_path / "training_state" / "checkpoint-2"
    manager.save(accelerator, 3)  # rotation (limit 2) removes the oldest, wherever it is
    assert [p.relative_to(tmp_path).as_posix() for p in manager.checkpoints()] == ["training_state/checkpoint-2",
                                                                                   "checkpoint-3"]


def test_locate_nonfinite_names_the_first_bad_module() -> None:
    model = tiny("lora")
    with torch.no_grad():
        layer = dict(mms.iter_adapters(model))["2"]
        layer.lora_B.fill_(float("inf"))
    x = torch.randn(2, 8)
    assert locate_nonfinite({"net": model}, lambda: model(x)) == "net.2 (AdapterLayer)"
    fine = tiny("lora")
    assert locate_nonfinite({"net": fine}, lambda: fine(x)) is None
    with pytest.raises(NonFiniteError, match=r"non-finite loss=nan at step 7; first NaN/inf appears in net\.2.*No checkpoint"):
        check_finite({"loss": float("nan"), "aux_loss": 0.0}, 7, lambda: "net.2", None)
    check_finite({"loss": 1.0}, 1, lambda: pytest.fail("only called on failure"), None)


def test_param_groups_and_fp32_cast() -> None:
    a, b = tiny("lora"), nn.Linear(3, 3).requires_grad_(False)
    groups = param_groups({"unet": a, "frozen": b}, {"unet": 1e-3, "*": 5e-4}, {"unet": 0.1})
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [("unet", 1e-3, 0.1, 4)]
    with pytest.raises(ConfigError, match="no trainable parameters"):
        param_groups({"frozen": b}, {"*": 1e-3})
    half = tiny("lora").to(torch.bfloat16)
    assert cast_trainable_params([half]) == 4
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_step_generator_is_a_function_of_its_keys() -> None:
    draw = lambda *k: torch.randn(4, generator=step_generator(0, *k))  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(1, 5)) and not torch.equal(draw(0, 5), draw(0, 6))


def test_image_grid_tiles() -> None:
    from PIL import Image

    grid = image_grid([Image.new("RGB", (8, 6), c) for c in ("red", "green", "blue")])
    assert grid.size == (16, 12) and grid.getpixel((9, 0)) == (0, 128, 0) and grid.getpixel((0, 7)) == (0, 0, 255)


def test_activation_checkpointing_is_on_without_the_deprecated_alias() -> None:
    """transformers 5.x deprecates gradient_checkpointing_enable (removed in v6): the helper uses the new name,
    checkpointing is on and the model still trains (same loss and gradient as without checkpointing)."""
    import warnings

    from transformers import LlamaForCausalLM

    from mm_subspace.compat import enable_activation_checkpointing
    from mm_subspace.tiny_models import tiny_llama_path

    torch.manual_seed(0)
    ids = torch.randint(300, 4000, (2, 10))
    losses, grads = [], []
    for checkpoint in (False, True):
        model = LlamaForCausalLM.from_pretrained(tiny_llama_path(), dtype=torch.float32)
        model.train()
        if checkpoint:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)
                enable_activation_checkpointing(model)
            assert checkpointing_on(model)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_is_dora_and_method_flag_values_follow_the_registry():
    import argparse

    from mm_subspace.training_utils import check_method_flags, is_dora, method_flag_values

    assert is_dora("dora") and not is_dora("lora") and not is_dora("moslora")
    args = argparse.Namespace(adapter="moslora", mixer_init="orthogonal", num_subspaces=None, balance_coef=None)
    assert method_flag_values(args) == {"mixer_init": "orthogonal"}
    args.adapter = "lora"  # lora has no mixer: the flag is not passed on
    assert method_flag_values(args) == {}
    sulora = argparse.Namespace(adapter="sulora", mixer_init=None, num_subspaces=8, pairing="index", a_init="kaiming",
                                router_temperature=0.5, balance_coef=0.0)
    assert method_flag_values(sulora) == {"num_subspaces": 8, "pairing": "index", "a_init": "kaiming",
                                          "router_temperature": 0.5, "balance_coef": 0.0}  # 0 is a value, not "unset"
    asy = argparse.Namespace(**{**vars(sulora), "adapter": "asylora", "num_subspaces": None, "pairing": None,
                                "router_temperature": None, "balance_coef": None})
    assert method_flag_values(asy) == {"a_init": "kaiming"}
    with pytest.raises(ConfigError, match="--pairing does not apply to --adapter asylora; it is a flag of sulora"):
        check_method_flags(argparse.Namespace(**{**vars(asy), "pairing": "paired"}))


def test_shared_script_flags_are_defined_once_and_overridable():
    import argparse

    from mm_subspace.training.script_flags import SHARED_FLAGS, add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser, "--rank", "--seed", rank={"default": 16})
    args = parser.parse_args([])
    assert (args.rank, args.seed) == (16, SHARED_FLAGS["--seed"]["default"])
    with pytest.raises(KeyError, match="overrides for flags not added"):
        add_flags(argparse.ArgumentParser(), "--rank", seed={"default": 1})


X_NET = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))  # input of conftest.net


# -- the NaN guard names the first non-finite adapted module -----------------------------------------------------
def test_nonfinite_adapter_output_is_reported_with_module_name():
    from mm_subspace.training_utils import check_finite, locate_nonfinite, nonfinite_parameters

    m = adapted()
    with torch.no_grad():
        m[2].adapters["default"].lora_B[0, 0] = float("nan")
    loss = m(X_NET).pow(2).mean()
    assert not torch.isfinite(loss)
    where = locate_nonfinite({"unet": m}, lambda: m(X_NET))
    assert where == "unet.2 (AdapterLayer)"
    assert nonfinite_parameters({"unet": m}) == ["unet.2.adapters.default.lora_B"]
    with pytest.raises(NonFiniteError, match=r"non-finite loss=nan at step 7; first NaN/inf appears in unet\.2 \(AdapterLayer\)"):
        check_finite({"loss": loss.item() if not loss.requires_grad else float(loss.detach())}, step=7, where=lambda: where,
                     last_checkpoint=None)
    check_finite({"loss": 1.0}, step=1, where=lambda: "unused", last_checkpoint=None)  # finite: no error


def test_inf_in_base_input_names_the_first_module():
    from mm_subspace.training_utils import locate_nonfinite

    m = adapted()
    with torch.no_grad():
        m[0].base_layer.weight[0, 0] = float("inf")
    assert locate_nonfinite({"model": m}, lambda: m(X_NET)) == "model.0.base_layer (Linear)"


# -- resuming runs no code and names the broken checkpoint --------------------------------------------
class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _three_checkpoints(root: Path, method: str = "moslora"):
    """A 3-step run on the CPU with a checkpoint per step: (accelerator, manager, model, optimizer, history)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny(method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    manager = CheckpointManager(root, method)
    manager.register_hooks(accelerator, {"net": model})
    manager.history = LossHistory()
    model, optimizer = accelerator.prepare(model, optimizer)
    inputs = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    for step in (1, 2, 3):
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.history.append(step, loss=0.5 / step)
        manager.save(accelerator, step)
    return accelerator, manager, model, optimizer


def test_resume_never_unpickles_accelerate_custom_state(tmp_path: Path) -> None:
    accelerator, manager, _, _ = _three_checkpoints(tmp_path)
    latest = manager.root / "checkpoint-3"
    assert not list(latest.glob("custom_checkpoint_*")), "nothing may be registered for a pickled custom state"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["loss_history"] == [{"step": s, "loss": 0.5 / s} for s in (1, 2, 3)]
    marker = tmp_path / "code-ran"
    torch.save({"rows": [], "payload": _RunsCode(str(marker))}, latest / "custom_checkpoint_0.pkl")
    with pytest.raises(ConfigError, match=r"holds custom_checkpoint_0.pkl: pickled state .* Delete the file"):
        manager.find_resumable("latest", ["net"])
    assert not marker.exists()
    (latest / "custom_checkpoint_0.pkl").unlink()
    manager.history.rows.clear()
    path, state = manager.find_resumable("latest", ["net"])
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    manager.restore(state)
    assert not marker.exists()
    assert [r["step"] for r in manager.history.rows] == [1, 2, 3]
    torch.save({"state": {}, "payload": _RunsCode(str(marker))}, latest / "optimizer.bin")
    with pytest.raises(AdapterFileError, match=r"checkpoint-3/optimizer.bin cannot be read as tensors"):
        manager.find_resumable("checkpoint-3", ["net"])
    assert not marker.exists()


@pytest.mark.parametrize(("breakage", "says"), [
    ("state_list", "must hold a JSON object, found list"),
    ("state_no_step", "'step' is missing"),
    ("state_not_utf8", "is not UTF-8"),
    ("optimizer_truncated", "optimizer.bin cannot be read as tensors"),
    ("weights_truncated", "adapter_model.safetensors does not match the checksum"),
])
def test_broken_checkpoint_is_named_and_latest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          breakage: str, says: str) -> None:
    _, manager, _, _ = _three_checkpoints(tmp_path)
    broken = manager.root / "checkpoint-3"
    state = broken / "trainer_state.json"
    if breakage == "state_list":
        state.write_text("[3]")
    elif breakage == "state_no_step":
        state.write_text('{"method": "moslora"}')
    elif breakage == "state_not_utf8":
        state.write_bytes(b'{"step": 3, "method": "mos\xfflora"}')
    else:
        target = broken / ("optimizer.bin" if breakage == "optimizer_truncated" else "net/adapter_model.safetensors")
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        path, resumed = manager.find_resumable("latest", ["net"])
    assert path.name == "checkpoint-2" and resumed["step"] == 2
    assert "skipping checkpoint-3, it is broken" in caplog.text and says in caplog.text
    with pytest.raises(AdapterFileError) as err:
        manager.find_resumable("checkpoint-3", ["net"])
    message = str(err.value)
    assert f"checkpoint {broken} cannot be resumed" in message and says in message
    assert "previous complete checkpoint is" in message and "--resume_from_checkpoint checkpoint-2" in message
    for name in ("checkpoint-1", "checkpoint-2"):
        (manager.root / name / "trainer_state.json").write_text("{}")
    with pytest.raises(AdapterFileError, match="no complete checkpoint in"):
        manager.find_resumable("latest", ["net"])


def test_other_adapter_settings_are_refused_before_any_model_loads(tmp_path: Path) -> None:
    _, manager, _, _ = _three_checkpoints(tmp_path)
    same = mms.config_for("moslora", rank=2, targets=["0", "2"])
    assert manager.find_resumable("latest", ["net"], {"net": same})[1]["step"] == 3
    with pytest.raises(ConfigError, match=r"other adapter settings: --rank 2 \(this run: 4\)"):
        manager.find_resumable("latest", ["net"], {"net": same.replace(rank=4)})
    with pytest.raises(ConfigError, match=r"--target_preset \['0', '2'\] \(this run: \['0'\]\)"):
        manager.find_resumable("latest", ["net"], {"net": same.replace(targets=["0"])})


def test_no_checkpoint_of_nonfinite_parameters(tmp_path: Path) -> None:
    accelerator, manager, model, _ = _three_checkpoints(tmp_path)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"non-finite parameters at step 4; first NaN/inf appears in adapter parameters "
                       r"\['net\..*without saving checkpoint-4\. The last good checkpoint .*checkpoint-3 is kept"):
        manager.save(accelerator, 4)
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not list(manager.root.glob(".checkpoint-4*"))


def test_ema_is_bias_corrected_and_follows_the_recurrence() -> None:
    assert ema([3.0] * 5, 0.9) == pytest.approx([3.0] * 5)  # no pull toward 0 at the start
    values = [1.0, 0.0, 2.0, 5.0]
    m, expected = 0.0, []
    for t, x in enumerate(values, start=1):  # m_t = s m_{t-1} + (1 - s) x_t, reported as m_t / (1 - s^t)
        m = 0.8 * m + 0.2 * x
        expected.append(m / (1 - 0.8**t))
    assert ema(values, 0.8) == pytest.approx(expected)
    assert ema(values, 0.0) == values
    assert curve_smoothing(5) == 0.0 and curve_smoothing(250) == pytest.approx(0.96) and curve_smoothing(10**6) == 0.98
    with pytest.raises(ValueError, match="smoothing"):
        ema(values, 1.0)


def test_loss_curve_draws_the_raw_loss_and_its_ema(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn.append((kw.get("label"), list(y))) or original(self, x, y, **kw))
    history = LossHistory()
    noisy = [1.0 + (-1) ** i * 0.5 for i in range(200)]  # batch-1 noise around 1.0
    for step, value in enumerate(noisy, start=1):
        history.append(step, loss=value, aux_loss=0.0, lr=1e-3)
    assert save_loss_curve(history, tmp_path / "curve.png").is_file()
    labels = dict(drawn)
    assert labels["loss (raw)"] == noisy  # no aux loss series (all zero), no lr
    smooth = labels["loss (EMA, smoothing 0.95)"]
    assert smooth == pytest.approx(ema(noisy, 0.95)) and max(abs(v - 1.0) for v in smooth[50:]) < 0.05


def test_grids_upscale_small_images_nearest_to_256_px(tmp_path: Path) -> None:
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    small = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()) for _ in range(4)]
    grid = Image.open(save_image_grid(small, tmp_path / "grid.png", cols=4))
    assert grid.size == (4 * 256, 256)
    block = grid.crop((256, 0, 512, 256)).resize((32, 32), Image.Resampling.NEAREST)
    assert block.tobytes() == small[1].convert("RGB").tobytes()  # every pixel an 8x8 block of the original
    assert grid.getpixel((256 + 7, 7)) == grid.getpixel((256, 0))
    big = [Image.new("RGB", (300, 300), "red")]
    assert Image.open(save_image_grid(big, tmp_path / "big.png")).size == (300, 300)  # large images untouched
    assert image_grid(small, cols=2).size == (64, 64)  # image_grid alone keeps the size unless asked
