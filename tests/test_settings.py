"""The config package: settings scoped to their step (a group per step, composed into Config), and a
run frozen only on what shapes training."""
import dataclasses
from pathlib import Path

from dbnb.core.config import (FIELDS, FROZEN, FROZEN_GROUPS, GROUPS, SECTIONS, ClassImageSettings, Config,
                              EvaluateSettings, ModelSettings, PrepSettings, group_of)


def test_every_setting_is_in_exactly_one_group_and_the_groups_make_the_config():
    names = [f.name for g in GROUPS for f in dataclasses.fields(g)]
    assert len(names) == len(set(names)), "a setting declared in two groups"
    assert set(names) == set(FIELDS) == {f.name for f in dataclasses.fields(Config)}
    assert all(issubclass(Config, g) for g in GROUPS) and set(FROZEN_GROUPS) <= set(GROUPS)
    assert [f.name for f in dataclasses.fields(Config)] == names  # bases listed so: GROUPS order


def test_settings_are_listed_by_section_whichever_group_declares_them():
    sections = [SECTIONS.index(f.metadata["section"]) for f in FIELDS.values()]
    assert sections == sorted(sections)
    assert list(Config().to_dict()) == list(FIELDS)
    # the Class Images section: the trainer's settings first, then the class-image maker's
    section = [n for n, f in FIELDS.items() if f.metadata["section"] == "Class Images"]
    assert section[:3] == ["with_prior_preservation", "num_class_images", "prior_loss_weight"]


def test_the_groups_a_run_does_not_freeze_belong_to_their_own_step():
    steps = {ModelSettings: "setup", PrepSettings: "dataset", ClassImageSettings: "class_images",
             EvaluateSettings: "test"}
    for group, step in steps.items():
        assert {f.metadata["step"] for f in dataclasses.fields(group)} == {step}, group.__name__


def test_a_run_freezes_what_shapes_training_and_everything_a_resume_may_not_change():
    # every setting marked `learns` (a resume must keep it) is frozen: nothing that blocked a resume stops
    learns = [n for n, f in FIELDS.items() if f.metadata["learns"] and n not in FROZEN]
    assert not learns
    # the class-image settings the trainer reads are frozen; those that only make the pictures are not
    for name in ("with_prior_preservation", "prior_loss_weight", "num_class_images", "class_data_dir", "class_prompt",
                 "resolution", "instance_data_dir", "learning_rate", "pretrained_model_name_or_path"):
        assert name in FROZEN, name
    for name in ("class_guidance_scale", "class_infer_steps", "class_images_mode", "tag_threshold",
                 "remove_background", "test_seeds", "test_fidelity_prompts", "score_with"):
        assert name not in FROZEN, name
        assert group_of(name) not in FROZEN_GROUPS
    config = Config(sample_prompts=("a", "b"), test_seeds=2)
    assert config.frozen() == {n: v for n, v in config.to_dict().items() if n in FROZEN}
    assert config.frozen()["sample_prompts"] == ["a", "b"] and "test_seeds" not in config.frozen()


def test_each_config_module_stays_small():
    folder = Path(__file__).resolve().parents[1] / "dbnb" / "core" / "config"
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in folder.glob("*.py")}
    assert {"__init__.py", "declare.py", "whole.py", "checks.py", "io.py", "presets.py"} <= set(sizes)
    assert all(n < 500 for n in sizes.values()), sizes


class _Run:
    """What check_resume_config reads of a run folder: its saved config.json."""
    def __init__(self, saved: dict):
        self.saved, self.root, self.config_path = saved, Path("runs/run"), Path("runs/run/config.json")

    def saved_config(self) -> dict:
        return self.saved


def test_a_prep_class_image_or_test_change_never_blocks_a_resume_while_a_training_change_does(capsys):
    import pytest

    from dbnb.core.config import ConfigError
    from dbnb.train.loop import check_resume_config

    started = Config(with_prior_preservation=True, class_prompt="Unan", class_data_dir="class", num_class_images=10)
    # an old run's config.json: every setting, with the run's keys beside them
    saved = {**started.to_dict(), "run_id": "abc", "dbnb_version": "0.1.0"}
    check_resume_config(_Run(saved), started.replace(
        tag_threshold=0.5, remove_background=False, class_guidance_scale=7.0, class_infer_steps=20,
        class_images_mode="import", test_seeds=2, test_fidelity_prompts=["nanU Unan, smile"], score_with="ccip"))
    assert capsys.readouterr().out == ""  # not compared, so not even said
    check_resume_config(_Run(saved), started.replace(gradient_checkpointing=False, sample_steps=3))
    assert "resuming with changed settings: gradient_checkpointing True -> False, sample_steps 20 -> 3" in (
        capsys.readouterr().out)
    for change in (dict(learning_rate=2e-6), dict(num_class_images=20), dict(prior_loss_weight=0.5),
                   dict(class_prompt="Other"), dict(resolution=256)):
        (name, value), = change.items()
        with pytest.raises(ConfigError, match=rf"change what it learns: {name} .* -> {value!r} .*Set them back"):
            check_resume_config(_Run(saved), started.replace(**change))
    # a setting a run from an older dbnb did not record is not compared
    del saved["prior_loss_weight"]
    check_resume_config(_Run(saved), started.replace(prior_loss_weight=0.5))
