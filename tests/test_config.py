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
