"""Checkpoints: exact round trips, clear errors for damaged or mismatched files, atomic saves, no pickle."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from diffusion_course import checkpoints
from diffusion_course.checkpoints import latest_checkpoint, load_checkpoint, load_training_state, save_checkpoint
from diffusion_course.schedules import cosine_schedule, linear_schedule
from diffusion_course.training import diffusion_loss


def probe(model):
    """The model's output on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, model.config.in_channels, model.config.image_size, model.config.image_size,
                    generator=generator)
    t = torch.tensor([0, 500, 999])
    cond = None if model.null_class is None else torch.tensor([1, 2, model.null_class])
    with torch.no_grad():
        return model(x, t, cond)


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_gives_identical_outputs(tiny_cond_unet, tmp_path):
    schedule = cosine_schedule(500)
    state = {"rng": torch.arange(5, dtype=torch.uint8), "model.x": torch.randn(2, 3)}
    path = save_checkpoint(tmp_path / "ckpt", tiny_cond_unet, schedule, step=7,
                           info={"dataset": "mnist", "note": "hello"}, training_state=state)
    assert path == tmp_path / "ckpt"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors",
                                                      "training_state.safetensors"]
    loaded = load_checkpoint(path)
    assert loaded.path == path
    assert not loaded.model.training
    assert loaded.model.config == tiny_cond_unet.config
    assert torch.equal(probe(loaded.model), probe(tiny_cond_unet))
    for key, value in tiny_cond_unet.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert loaded.schedule.name == "cosine" and loaded.schedule.num_steps == 500
    assert torch.equal(loaded.schedule.alpha_bar, schedule.alpha_bar)
    assert loaded.info["step"] == 7 and loaded.info["dataset"] == "mnist" and loaded.info["note"] == "hello"
    restored = load_training_state(path)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert not list(tmp_path.glob(".*")), "no temporary folders may be left behind"


def test_unconditional_round_trip_and_device(tiny_unet, tmp_path):
    save_checkpoint(tmp_path, tiny_unet, linear_schedule())
    loaded = load_checkpoint(tmp_path, device=torch.device("cpu"))
    assert loaded.model.null_class is None
    assert torch.equal(probe(loaded.model), probe(tiny_unet))
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    with pytest.raises(FileNotFoundError, match="no training state"):
        load_training_state(tmp_path)


def test_saving_again_replaces_the_checkpoint(make_tiny_unet, tmp_path):
    first, second = make_tiny_unet(seed=0), make_tiny_unet(seed=1)
    save_checkpoint(tmp_path / "ckpt", first, linear_schedule(), step=1)
    save_checkpoint(tmp_path / "ckpt", second, linear_schedule(), step=2)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.info["step"] == 2
    assert torch.equal(probe(loaded.model), probe(second))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_run_folder_loads_its_latest_checkpoint(make_tiny_unet, tmp_path):
    for step in (100, 2000, 300):
        save_checkpoint(tmp_path / f"step_{step:08d}", make_tiny_unet(seed=step), linear_schedule(), step=step)
    (tmp_path / "step_00009999").mkdir()          # an empty folder is not a checkpoint
    assert latest_checkpoint(tmp_path).name == "step_00002000"
    loaded = load_checkpoint(tmp_path)
    assert loaded.info["step"] == 2000
    assert torch.equal(probe(loaded.model), probe(make_tiny_unet(seed=2000)))
    assert latest_checkpoint(tmp_path / "step_00009999") is None


def test_pretrained_mnist(request):
    if not (checkpoints.PRETRAINED_DIR / "mnist").is_dir():
        pytest.skip("diffusion_course/pretrained/mnist does not exist yet")
    loaded = load_checkpoint("mnist")
    config = loaded.model.config
    assert (config.in_channels, config.image_size, config.num_classes) == (1, 28, 10)
    assert loaded.info["dataset"] == "mnist"
    assert loaded.path == checkpoints.PRETRAINED_DIR / "mnist"
    # A trained model removes most of the noise from real digits; an untrained one scores about 1.
    digits = request.getfixturevalue("mnist_subset")
    generator = torch.Generator().manual_seed(0)
    x0, labels = digits.images[:32], digits.labels[:32]
    t = torch.randint(50, 900, (32,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        loss = diffusion_loss(loaded.model, x0, loaded.schedule, cond=labels, t=t, noise=noise).item()
    assert loss < 0.3, f"the pretrained model's loss on real digits is {loss:.3f}"


def test_missing_folder_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint(tmp_path)                # exists, but holds nothing


def test_truncated_weights_rejected(tiny_unet, tmp_path):
    save_checkpoint(tmp_path, tiny_unet, linear_schedule())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        load_checkpoint(tmp_path)


def test_damaged_training_state_rejected(tiny_unet, tmp_path):
    save_checkpoint(tmp_path, tiny_unet, linear_schedule(), training_state={"a": torch.ones(100)})
    state = tmp_path / "training_state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-1] ^= 0xFF                              # one flipped byte, same length
    state.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged or truncated"):
        load_training_state(tmp_path)


def test_missing_weights_rejected(tiny_unet, tmp_path):
    save_checkpoint(tmp_path, tiny_unet, linear_schedule())
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(tmp_path)


def test_weights_for_another_shape_rejected(tiny_unet, tmp_path):
    save_checkpoint(tmp_path, tiny_unet, linear_schedule())
    info = json.loads((tmp_path / "config.json").read_text())
    info["model"]["base_channels"] = 16          # the config now describes a wider network
    (tmp_path / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="do not match the model config"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "something-else", "version": 1}), "is not a diffusion-course checkpoint"),
    (json.dumps({"format": "diffusion-course-checkpoint", "version": 99}), "is not a diffusion-course checkpoint"),
])
def test_bad_config_json_rejected(tiny_unet, tmp_path, text, message):
    save_checkpoint(tmp_path, tiny_unet, linear_schedule())
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path)


def test_crash_mid_save_leaves_the_previous_checkpoint(make_tiny_unet, tmp_path, monkeypatch):
    path = tmp_path / "step_00000001"
    old_model = make_tiny_unet(seed=0)
    save_checkpoint(path, old_model, linear_schedule(), step=1)
    before = file_bytes(path)
    real_save_file = checkpoints.save_file

    def crash_after_half(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:                  # half a file on disk, then the crash
            f.truncate(len(f.read()) // 2)
        raise OSError("simulated crash: disk full")

    monkeypatch.setattr(checkpoints, "save_file", crash_after_half)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, make_tiny_unet(seed=5), linear_schedule(), step=2)
    monkeypatch.undo()
    assert file_bytes(path) == before
    loaded = load_checkpoint(tmp_path)                     # the run folder still resolves to it
    assert loaded.info["step"] == 1 and loaded.path == path
    assert torch.equal(probe(loaded.model), probe(old_model))


def test_crash_while_replacing_leaves_the_previous_checkpoint(make_tiny_unet, tmp_path, monkeypatch):
    """Saving over an existing checkpoint: the old folder must survive until the new one is complete,
    even when moving folders fails (here every rename fails, as on a full or read-only disk)."""
    path = tmp_path / "ckpt"
    old_model = make_tiny_unet(seed=0)
    save_checkpoint(path, old_model, linear_schedule(), step=1)
    before = file_bytes(path)

    def failing_rename(src, dst, *args, **kwargs):
        raise OSError("simulated crash: rename failed")

    monkeypatch.setattr(checkpoints.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, make_tiny_unet(seed=5), linear_schedule(), step=2)
    monkeypatch.undo()
    assert file_bytes(path) == before
    assert torch.equal(probe(load_checkpoint(path).model), probe(old_model))


def test_loading_never_unpickles(tiny_cond_unet, tmp_path, monkeypatch):
    save_checkpoint(tmp_path, tiny_cond_unet, linear_schedule(), training_state={"a": torch.ones(3)})

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoints must not be unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(probe(loaded.model), probe(tiny_cond_unet))
    assert torch.equal(load_training_state(tmp_path)["a"], torch.ones(3))


# --- model types, optional schedule, run state --------------------------------------------------------

def test_config_json_names_the_model_type_and_old_files_load_as_unet(tiny_unet, tmp_path):
    save_checkpoint(tmp_path, tiny_unet, linear_schedule())
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["type"] == "unet" and checkpoints.MODELS["unet"][0] is type(tiny_unet)
    del info["type"]                                     # a file written before the registry
    (tmp_path / "config.json").write_text(json.dumps(info))
    assert torch.equal(probe(load_checkpoint(tmp_path).model), probe(tiny_unet))
    info["type"] = "transformer"
    (tmp_path / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="unknown model type 'transformer'"):
        load_checkpoint(tmp_path)


def test_the_shipped_model_still_verifies():
    """The pretrained files are not rewritten: they have no "type" and their SHA-256s still match."""
    folder = checkpoints.PRETRAINED_DIR / "mnist"
    info = checkpoints.read_info(folder)
    assert "type" not in info
    assert checkpoints.sha256(folder / "model.safetensors") == info["sha256"]["model.safetensors"]
    assert isinstance(load_checkpoint("mnist").model, checkpoints.MODELS["unet"][0])


def test_a_model_without_a_schedule_round_trips(tiny_unet, tmp_path):
    save_checkpoint(tmp_path, tiny_unet, None, info={"objective": "flow matching"})
    loaded = load_checkpoint(tmp_path)
    assert loaded.schedule is None and loaded.info["objective"] == "flow matching"
    save_checkpoint(tmp_path / "b", tiny_unet, info={"schedule": cosine_schedule(500).to_config()})
    assert load_checkpoint(tmp_path / "b").schedule.num_steps == 500       # a schedule given as info


def test_info_may_not_overwrite_the_checkpoints_own_keys(tiny_unet, tmp_path):
    with pytest.raises(ValueError, match=r"info may not set \['step'\]"):
        save_checkpoint(tmp_path, tiny_unet, linear_schedule(), info={"step": 3})
    with pytest.raises(ValueError, match="differs from the schedule given"):
        save_checkpoint(tmp_path, tiny_unet, linear_schedule(), info={"schedule": cosine_schedule().to_config()})
    assert list(tmp_path.iterdir()) == []


def test_run_state_round_trip(make_tiny_unet, tmp_path):
    """The optimizer's whole state_dict, the generator and the data order come back exactly."""
    model, ema_model = make_tiny_unet(seed=0).train(), make_tiny_unet(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        diffusion_loss(model, torch.rand(4, 1, 8, 8) * 2 - 1, linear_schedule()).backward()
        optimizer.step()
    optimizer.param_groups[0]["lr"] = 5e-4
    generator = torch.Generator().manual_seed(11)
    torch.rand(3, generator=generator)
    order = torch.tensor([5, 2, 7])
    checkpoints.save_run_state(tmp_path / "step_00000002", model, ema_model, optimizer, generator=generator,
                               order=order, step=2, info={"seconds": 1.5})
    model2, ema2 = make_tiny_unet(seed=5), make_tiny_unet(seed=6)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    generator2 = torch.Generator()
    state = checkpoints.load_run_state(tmp_path / "step_00000002", model2, ema2, optimizer2, generator=generator2)
    assert state.step == 2 and torch.equal(state.order, order) and state.info["seconds"] == 1.5
    assert torch.equal(probe(model2.eval()), probe(model.eval())) and torch.equal(probe(ema2), probe(ema_model))
    assert torch.equal(generator2.get_state(), generator.get_state())
    saved, loaded = optimizer.state_dict(), optimizer2.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys()
    for index, values in saved["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(loaded["state"][index][k])) for k, v in values.items())
    assert load_checkpoint(tmp_path).path.name == "step_00000002"        # a run folder of one checkpoint


# --- issue 12 (5) and (11): only our own folders are sorted, pruned or replaced ------------------------

def test_latest_checkpoint_ignores_a_users_step_folders(make_tiny_unet, tmp_path):
    """`latest_checkpoint` used to sort step_final (and step_00000002_best) last and pick it."""
    save_checkpoint(tmp_path / "step_00000001", make_tiny_unet(seed=1), linear_schedule(), step=1)
    for name in ("step_final", "step_00000002_best", "step_123"):
        save_checkpoint(tmp_path / name, make_tiny_unet(seed=2), linear_schedule(), step=99)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert [p.name for p in checkpoints.run_checkpoints(tmp_path)] == ["step_00000001"]
    checkpoints.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002_best", "step_123",
                                                          "step_final"]


def test_saving_onto_a_folder_that_is_not_a_checkpoint_refuses(tiny_unet, tmp_path):
    """`save_checkpoint` onto an existing non-checkpoint folder used to delete what was in it."""
    folder = tmp_path / "my_notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="Refusing to replace .*my_notes: it exists and is not a"):
        save_checkpoint(folder, tiny_unet, linear_schedule())
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="Refusing to replace"):
        save_checkpoint(tmp_path / "a_file", tiny_unet, linear_schedule())
    assert (tmp_path / "a_file").read_text() == "x"
    assert not list(tmp_path.glob(".*")), "no temporary folders may be left behind"


# --- issue 12: shipped names shadowed by a folder of yours, damaged config.json --------------------

def test_a_run_folder_of_yours_named_like_a_shipped_model_wins(make_tiny_unet, tmp_path, monkeypatch):
    """`--checkpoint mnist` used to ignore a ./mnist run folder without a word."""
    from diffusion_course.schedules import cosine_schedule
    monkeypatch.chdir(tmp_path)
    checkpoints.save_checkpoint(tmp_path / "mnist" / "step_00000007", make_tiny_unet(), cosine_schedule(40), step=7)
    assert checkpoints.resolve_checkpoint("mnist") == Path("mnist") / "step_00000007"
    assert checkpoints.resolve_checkpoint("pretrained:mnist") == checkpoints.PRETRAINED_DIR / "mnist"


def test_a_folder_without_checkpoints_named_like_a_shipped_model_is_a_reported_clash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    with pytest.raises(ValueError, match="'mnist' is both a shipped model and the folder ./mnist.*pretrained:mnist"):
        checkpoints.resolve_checkpoint("mnist")
    with pytest.raises(FileNotFoundError, match="No shipped model called 'cifar'"):
        checkpoints.resolve_checkpoint("pretrained:cifar")


@pytest.mark.parametrize("edit, message", [
    (lambda info: info.pop("model"), r"'model' should be a dict, got 'nothing'"),
    (lambda info: info.__setitem__("model", "unet"), r"'model' should be a dict, got 'unet'"),
    (lambda info: info.pop("sha256"), r"'sha256' should be a dict"),
    (lambda info: info.__setitem__("step", "7"), r"'step' should be a int"),
    (lambda info: info.__setitem__("schedule", "cosine"), r"'schedule' should be a dict"),
])
def test_a_damaged_config_json_is_a_clear_error(tiny_unet, tmp_path, edit, message):
    """A missing key or a wrong type used to end in a KeyError/TypeError traceback."""
    import json
    from diffusion_course.schedules import cosine_schedule
    folder = checkpoints.save_checkpoint(tmp_path / "ck", tiny_unet, cosine_schedule(40))
    info = json.loads((folder / "config.json").read_text())
    edit(info)
    (folder / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=message):
        checkpoints.load_checkpoint(folder)


def test_a_full_disk_while_saving_is_an_os_error_and_leaves_the_previous_checkpoint(make_tiny_unet, tmp_path, monkeypatch):
    """The Rust writer's SafetensorError ('File too large') used to escape the CLI as a traceback."""
    from safetensors import SafetensorError
    from diffusion_course.schedules import cosine_schedule
    folder = checkpoints.save_checkpoint(tmp_path / "ck", make_tiny_unet(), cosine_schedule(40), step=1)
    before = file_bytes(folder)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    with pytest.raises(OSError, match="Could not write the checkpoint .* is the disk full"):
        checkpoints.save_checkpoint(folder, make_tiny_unet(), cosine_schedule(40), step=2)
    assert file_bytes(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]          # no partial folder left behind
