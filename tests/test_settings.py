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
