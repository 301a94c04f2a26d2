import json

import pytest

from dbnb.core.config import FIELDS, PRESETS, Config, ConfigError, describe, from_dict, load_config
from dbnb.faces.cli import main


def test_defaults_are_the_seeds_character_settings():
    c = Config()
    assert c.learning_rate == 1e-6
    assert c.hflip is False
    assert (c.use_8bit_adam, c.gradient_checkpointing, c.mixed_precision) == (True, True, "fp16")
    assert c.lr_scheduler == "polynomial"
    assert (c.class_guidance_scale, c.class_infer_steps) == (12.0, 28)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    c = Config(instance_prompt="nanU Unan", class_prompt="Unan", with_prior_preservation=True,
               class_data_dir="cls", num_class_images=50, sample_prompts=("a", "b"), learning_rate=2e-6)
    path = c.save(tmp_path / f"c{suffix}")
    assert load_config(path) == c


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-6\nprior_loss_weight: 1\n")
    c = load_config(tmp_path / "c.yaml")
    assert c.learning_rate == 1e-6 and isinstance(c.prior_loss_weight, float)


def test_overrides_apply_after_preset_and_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 3e-6, "hflip": False}))
    c = load_config(tmp_path / "c.json", ["hflip=true", "sample_prompts=[x, y]", "run_name=a=b"],
                    preset="object_style")
    assert c.learning_rate == 3e-6 and c.hflip is True
    assert c.sample_prompts == ("x", "y") and c.run_name == "a=b"


def test_an_override_reads_as_the_value_config_takes():
    # bench scripts pass parse_override's values to Config directly; PyYAML reads 1e-6 as a string
    from dbnb.core.config import parse_override

    assert parse_override("learning_rate=1e-6") == ("learning_rate", 1e-6)
    assert parse_override("sample_prompts=[x, y]") == ("sample_prompts", ("x", "y"))
    assert Config(**dict([parse_override("learning_rate=5e-4")])).learning_rate == 5e-4


@pytest.mark.parametrize("override, field", [
    ("resolution=500", "resolution"),
    ("resolution=0", "resolution"),
    ("max_train_steps=0", "max_train_steps"),
    ("learning_rate=0", "learning_rate"),
    ("max_train_steps=1.5", "max_train_steps"),
    ("hflip=maybe", "hflip"),
    ("mixed_precision=fp8", "mixed_precision"),
    ("lr_scheduler=step", "lr_scheduler"),
    ("stop_text_encoder=1.5", "stop_text_encoder"),
    ("keep_last_n=0", "keep_last_n"),
    ("train_batch_size=0", "train_batch_size"),
    ("ema_decay=1", "ema_decay"),
    ("save_every_steps=-1", "save_every_steps"),
    ("caption_dropout_rate=1.5", "caption_dropout_rate"),
    ("caption_tag_dropout_rate=-0.1", "caption_tag_dropout_rate"),
    ("keep_tokens=-1", "keep_tokens"),
])
def test_each_bad_value_names_its_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(overrides=[override])


@pytest.mark.parametrize("run_name", ["../x", "/abs/run", "", "  ", "a/b", "..", "a\\b"])
def test_run_name_is_one_folder_name_inside_output_dir(run_name):
    with pytest.raises(ConfigError, match="run_name: .* must be a plain folder name"):
        Config(run_name=run_name)
    assert Config(run_name="花月 run (2)").run_name == "花月 run (2)"


@pytest.mark.parametrize("field", ["instance_prompt", "class_prompt", "instance_token", "class_token"])
def test_whitespace_only_prompts_are_refused(field):
    with pytest.raises(ConfigError, match=f"{field}: '   ' is only spaces"):
        Config(**{field: "   "})


def test_prior_preservation_needs_class_prompt_folder_and_count():
    with pytest.raises(ConfigError) as e:
        Config(with_prior_preservation=True)
    msg = str(e.value)
    assert "class_prompt" in msg and "class_data_dir" in msg and "num_class_images" in msg
    Config(with_prior_preservation=True, class_prompt="girl", class_data_dir="c", num_class_images=5)


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        from_dict({"lerning_rate": 1e-6})
    with pytest.raises(ConfigError, match="did you mean 'hflip'"):
        load_config(overrides=["hflipp=true"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(overrides=["hflip"])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="Unknown preset"):
        load_config(preset="landscape")


def test_a_yaml_file_an_editor_renamed_still_reads(tmp_path, capsys):
    (tmp_path / "my.yaml.txt").write_text("learning_rate: 2.0e-6\nrun_name: renamed\n")  # Windows' Notepad
    assert main(["config", str(tmp_path / "my.yaml.txt")]) == 0
    out = capsys.readouterr().out
    assert "run_name: renamed" in out and "learning_rate: 2.0e-06" in out


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().learning_rate = 1.0  # type: ignore[misc]
    assert Config().replace(learning_rate=2e-6).learning_rate == 2e-6


def test_every_field_has_section_label_and_help():
    rows = describe()
    assert [r["name"] for r in rows] == list(FIELDS)
    for r in rows:
        assert r["section"] and r["label"] and len(r["help"]) > 10, r["name"]
    labels = {r["label"] for r in rows}
    for known in ("Apply Horizontal Flip", "Save Checkpoint Frequency", "Use 8bit Adam",
                  "Total Number of Class/Reg Images", "Save Preview(s) Frequency", "Train EMA"):
        assert known in labels
    for preset in PRESETS.values():
        assert set(preset) <= set(FIELDS)


def test_cli_config_prints_and_rejects(capsys):
    assert main(["config", "learning_rate=2e-6", "--preset", "person"]) == 0
    assert "learning_rate: 2.0e-06" in capsys.readouterr().out
    assert main(["config", "resolution=100"]) == 2
    assert "resolution" in capsys.readouterr().err


def test_cli_config_list_shows_each_settings_help_in_english_and_japanese(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    for row in describe():
        assert row["help"] in out and row["help_ja"] in out, row["name"]
    flip = out.split("\nhflip ")[1]
    assert flip.index("Randomly mirror") < flip.index("左右反転") < flip.index("\nalpha_mask_loss ")


def test_workspace_config_takes_the_notebooks_parameters_by_name(tmp_path):
    from dbnb.faces.workspace import load_workspace

    first = load_workspace(tmp_path, {"pretrained_model_name_or_path": "m", "workspace": "ignored", "x": 1})
    assert first.pretrained_model_name_or_path == "m"
    second = load_workspace(tmp_path, {"hflip": True, "sample_prompts": ["a"]})
    assert second.pretrained_model_name_or_path == "m" and second.hflip and second.sample_prompts == ("a",)
    assert load_workspace(tmp_path) == second


def test_overrides_from_a_config_read_back_to_the_same_values():
    from dbnb.core.config import as_overrides, section_fields

    config = Config(test_fidelity_prompts=("a, b", "c: d"), test_seeds=2, test_guidance_scale=5.0,
                    test_steps="100,200", test_class_prompt_in_negative=True)
    names = section_fields("Test Prompts")
    assert "test_seeds" in names and "learning_rate" not in names
    assert load_config(overrides=as_overrides(config, names)) == config


def test_every_fields_own_limits_are_enforced_with_its_name_and_default():
    from dbnb.core.config import FIELDS

    limited = {n: f.metadata for n, f in FIELDS.items()
               if any(f.metadata[k] is not None for k in ("minimum", "above", "maximum"))}
    assert {"learning_rate", "train_batch_size", "keep_last_n", "caption_dropout_rate"} <= set(limited)
    for name, meta in limited.items():
        for bad in ([meta["minimum"] - 1] if meta["minimum"] is not None else []) \
                + ([meta["above"]] if meta["above"] is not None else []) \
                + ([meta["maximum"] + 1] if meta["maximum"] is not None else []):
            bad = type(FIELDS[name].default)(bad)
            with pytest.raises(ConfigError, match=rf"{name}: {bad} must .*\(default {FIELDS[name].default}\)"):
                Config(**{name: bad})


def test_resume_report_and_memory_facts_live_on_the_fields():
    from dbnb.core.config import FIELDS
    from dbnb.ship.report import changed_settings
    from dbnb.train.memory import memory_advice

    meta = {n: f.metadata for n, f in FIELDS.items()}
    assert not meta["max_train_steps"]["learns"] and meta["learning_rate"]["learns"]
    assert not meta["gradient_checkpointing"]["learns"] and not meta["test_seeds"]["learns"]
    # every memory-saving setting set the other way is named in the out-of-memory advice
    wasteful = Config(gradient_checkpointing=False, use_8bit_adam=False, cache_latents=False, use_ema=True,
                      mixed_precision="no", train_text_encoder=True, train_batch_size=2, sample_every_steps=100)
    advice = memory_advice(wasteful)
    saving = [n for n, m in meta.items() if m["memory_saving"] is not None]
    assert len(saving) >= 7 and all(n + "=" in advice for n in saving), advice
    assert "mixed_precision=fp16" in advice and "gradient_checkpointing=true" in advice
    assert "use_ema=false (for a new run" in advice  # its fp32 copy of the UNet: 3.4 GB of VRAM on SD 1.5
    assert memory_advice(Config(mixed_precision="bf16", train_batch_size=1, sample_every_steps=0,
                                train_text_encoder=False, cache_text_embeddings=True)).startswith("Every memory option")
    # paths and prompts have their own headings in the report; the always-shown ones are there unchanged
    shown = [name for name, _, _ in changed_settings(Config())]
    assert "learning_rate" in shown and "instance_prompt" not in shown and "output_dir" not in shown
    assert "instance_prompt" not in [n for n, _, _ in changed_settings(Config(instance_prompt="zzq girl"))]


def test_the_person_preset_is_the_guides_character_setup(capsys):
    from dbnb.core.config import GUIDE_CHARACTER

    c = load_config(preset="person")
    assert c.to_dict() == {**Config().to_dict(), **GUIDE_CHARACTER}
    assert (c.instance_prompt, c.class_prompt) == ("nanU Unan", "Unan")  # a rare name and its reversal
    assert c.with_prior_preservation and c.class_images_mode == "transparent" and c.num_class_images == 0
    assert (c.learning_rate, c.hflip, c.lr_warmup_steps, c.lr_scheduler) == (1e-6, False, 15, "polynomial")
    assert c.train_text_encoder and Config().train_text_encoder  # as the extension trained (issue 30)
    assert main(["config", "--preset", "person"]) == 0  # `dbnb config` prints it, valid as it is
    assert "class_images_mode: transparent" in capsys.readouterr().out


def test_the_preset_does_not_depend_on_what_is_installed():
    """The same preset with onnxruntime importable and with its import blocked."""
    import subprocess
    import sys

    show = ("import json\nfrom dbnb.core.config import PRESETS, load_config\n"
            "print(json.dumps([PRESETS, load_config(preset='person').to_dict()], sort_keys=True))\n")
    block = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'onnxruntime':\n"
             "            raise ImportError('blocked by the test')\n"
             "sys.meta_path.insert(0, Block())\nsys.modules['onnxruntime'] = None\n")
    check = block + "import importlib.util\ntry:\n    import onnxruntime\nexcept ImportError:\n    pass\n" \
        "else:\n    raise SystemExit('onnxruntime still imports')\n"
    runs = [subprocess.run([sys.executable, "-c", prefix + show], capture_output=True, text=True, check=True).stdout
            for prefix in ("", check)]
    assert runs[0] == runs[1] and "transparent" in runs[0]


@pytest.mark.parametrize("class_prompt, mode, warned", [
    ("1girl", "transparent", True), ("girl", "black", True), ("a person, solo", "transparent", True),
    ("(woman:1.2)", "transparent", True), ("Unan", "transparent", False), ("1girl", "generate", False),
    ("1girl", "import", False)])
def test_a_common_class_word_on_blank_class_images_is_warned(class_prompt, mode, warned):
    from dbnb.core.config import class_word_warning

    c = Config(with_prior_preservation=True, class_prompt=class_prompt, class_images_mode=mode,
               class_data_dir="c", num_class_images=5)
    text = class_word_warning(c)
    assert bool(text) == warned
    if warned:
        assert f"class_prompt {class_prompt!r}" in text and "class_prompt=Unan" in text and "nanU Unan" in text
    assert not class_word_warning(c.replace(with_prior_preservation=False))


def test_dbnb_config_warns_about_a_common_class_word_on_stderr(capsys):
    assert main(["config", "--preset", "person", "class_prompt=1girl"]) == 0
    out, err = capsys.readouterr()
    assert "class_prompt: 1girl" in out and err.startswith("warning: class_prompt '1girl'")
    assert main(["config", "--preset", "person"]) == 0 and not capsys.readouterr().err


def test_prior_preservation_takes_0_class_images_as_10x_only_for_blank_ones():
    Config(with_prior_preservation=True, class_prompt="Unan", class_data_dir="c", class_images_mode="transparent")
    with pytest.raises(ConfigError, match="num_class_images is 0"):
        Config(with_prior_preservation=True, class_prompt="Unan", class_data_dir="c", class_images_mode="generate")
