"""Config: defaults, YAML overrides, dotted command-line overrides, and loud failures on typos."""
import os

import pytest

from crossmodal.config import ConfigError, load_config, save_config, config_from_dict


def test_defaults_yaml_and_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out_dir: runs/x\ntrain:\n  lr: 1.0e-3\n  steps: 50\ndata:\n  train: shapes:train\n")
    cfg = load_config(str(path), ["--train.lr=3e-4", "--seed", "7", "--data.val=shapes:heldout"])
    assert cfg.out_dir == "runs/x"
    assert cfg.train.steps == 50
    assert cfg.train.lr == 3e-4  # the command line wins over the file
    assert cfg.seed == 7
    assert cfg.data.val == "shapes:heldout"
    assert cfg.train.batch_size == 128  # untouched default


def test_int_accepted_for_float_and_strings_stay_strings():
    cfg = load_config(None, ["--train.lr=1", "--out_dir=2024"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.out_dir == "2024"


def test_typo_names_the_key_and_closest_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*train\.lr"):
        load_config(None, ["--train.lrr=3e-4"])
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  batchsize: 64\n")
    with pytest.raises(ConfigError, match=r"train\.batchsize.*typo\.yaml.*train\.batch_size"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"did you mean.*train\.steps"):
        load_config(None, ["--steps=5"])  # right leaf, wrong section


def test_wrong_type_fails():
    with pytest.raises(ConfigError, match=r"train\.steps.*expects int.*float"):
        load_config(None, ["--train.steps=1.5"])
    with pytest.raises(ConfigError, match=r"model\.grad_checkpointing.*expects bool"):
        load_config(None, ["--model.grad_checkpointing=maybe"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--train.lr=2e-4", "--loss.name=siglip"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    import dataclasses

    assert config_from_dict(dataclasses.asdict(cfg)) == cfg


def test_every_shipped_run_config_loads_and_names_a_preset():
    """configs/*/ (all but the ablation grids): keys and types valid, a known model (the paper configs point at data that is
    not on this machine, so only what needs no files is checked)."""
    import glob

    from crossmodal.recipes import PRESETS

    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "configs", "*", "*.yaml")))
    paths = [path for path in paths if os.sep + "ablations" + os.sep not in path]
    assert len(paths) >= 6
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.name in PRESETS, path


def test_keys_that_moved_to_a_family_section_still_load(tmp_path, capsys):
    """Configs and checkpoints written before the family sections: an old key works where it is, with one note
    naming its new place (YAML file, command line); a checkpoint's config is mapped silently."""
    from crossmodal import config as config_module

    config_module._noted.clear()
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  name: BLIP-tiny\n  blip_momentum: 0.9\n  blip_losses: itc,itm\n  lm_checkpoint: lm.pt\n"
                    "data:\n  induction_fraction: 0.25\n")
    cfg = load_config(str(path), ["--model.blip_queue_size=0", "--model.blip_prompt=a picture of"])
    assert (cfg.blip.momentum, cfg.blip.losses, cfg.blip.queue_size, cfg.blip.prompt) == (0.9, "itc,itm", 0, "a picture of")
    assert cfg.flamingo.lm_checkpoint == "lm.pt" and cfg.lm.induction_fraction == 0.25
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 6 and "note: config key 'model.blip_momentum'" in notes[0] and "is now 'blip.momentum'" in notes[0]
    old_checkpoint_config = {"model": {"name": "BLIP-tiny", "blip_alpha_steps": 12, "blip_text_drop": 0.0},
                             "data": {"induction_fraction": 0.0}}
    restored = config_from_dict(old_checkpoint_config)
    assert restored.blip.alpha_steps == 12 and restored.blip.text_drop == 0.0
    assert capsys.readouterr().err == ""


def test_every_number_has_a_range_and_nan_inf_and_out_of_range_values_fail():
    import math

    from crossmodal.config import RANGES, Config, check_values, valid_keys

    numbers = {key for key, kind in valid_keys().items() if kind in (int, float)}
    assert set(RANGES) == numbers  # a new number needs its range
    assert check_values(Config()) is None  # the defaults are in range
    for key in numbers:
        if valid_keys()[key] is float:
            for value in ("nan", ".inf", "-.inf"):
                with pytest.raises(ConfigError, match=rf"^{key} must be a finite number .*\(command line\)$"):
                    load_config(None, [f"--{key}={value}"])
        below = RANGES[key].low - (0 if RANGES[key].open_low else 1)
        with pytest.raises(ConfigError, match=rf"^{key} must (be|lie) .*; got {below}"):
            load_config(None, [f"--{key}={below}"])
    cfg = load_config(None, ["--train.grad_clip=0", "--blip.queue_size=-1", "--data.image_size=0",
                             "--finetune.layer_decay=1", "--data.max_bad_fraction=1"])  # sentinels and closed ends
    assert (cfg.train.grad_clip, cfg.blip.queue_size, cfg.data.max_bad_fraction) == (0.0, -1, 1.0)
    for key, value, message in [("train.beta2", 1.0, r"train\.beta2 must lie in \[0, 1\); got 1\.0"),
                                ("seed", -1, r"seed must lie in \[0, 4294967295\]; got -1"),
                                ("finetune.layer_decay", 0.0, r"finetune\.layer_decay must lie in \(0, 1\]; got 0\.0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"--{key}={value}"])
    cfg.train.lr = math.nan  # a config changed in code is checked by check_values (recipes.check_config)
    assert check_values(cfg) == "train.lr must be a finite number > 0; got nan"


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: [1, 2\n", r"bad\.yaml: not valid YAML at line 3, column 1: expected ',' or '\]'.*"
                              r"\(while parsing a flow sequence at line 2, column 7\)"),
    ("model:\n  name: a: b\n", r"bad\.yaml: not valid YAML at line 2, column 10: mapping values are not allowed here"),
    ("!!python/object/apply:os.system [echo hi]\n", r"bad\.yaml: not valid YAML at line 1, column 1: could not "
                                                    r"determine a constructor"),
    ("- 1\n", r"bad\.yaml: expected a mapping of config keys at the top level, got list"),
    ("train: 5\n", r"config key 'train' \(.*bad\.yaml\) is a section: expected a mapping of its keys, got int 5"),
    ("train:\n  lr: {a: 1}\n", r"config key 'train\.lr' \(.*bad\.yaml\) expects float, got dict"),
    ("x: &loop {y: *loop}\n", r"unknown config key 'x\.y\.y'"),  # a YAML alias that refers to itself ends
    ("1: 2\n", r"unknown config key '1'"),
])
def test_a_broken_yaml_file_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_unreadable_config_files_and_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read it \(No such file or directory\)"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"cannot read it \(Is a directory\)"):
        load_config(str(tmp_path))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not UTF-8 text"):
        load_config(str(tmp_path / "binary.yaml"))
    with pytest.raises(ConfigError, match=r"--train\.lr=\[: not a YAML value"):
        load_config(None, ["--train.lr=["])
    assert load_config(None, ["--data.image_root=[x"]).data.image_root == "[x"  # a string key takes any text
    (tmp_path / "commented.yaml").write_text("train:\n  # lr: 1.0\n")
    assert load_config(str(tmp_path / "commented.yaml")) == load_config(None)  # an empty section


def test_save_config_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["--train.lr=2e-4"]), str(path))
    before = path.read_text()

    def interrupted(*args):
        raise KeyboardInterrupt  # the moment before the new file would take the old one's place

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_config(load_config(None), str(path))
    assert path.read_text() == before and os.listdir(tmp_path) == ["config.yaml"]
