"""The one typed config, one module per job: declare (setting()), the settings grouped by step (model, prep, train, tuning, classimages, evaluate), whole (Config), checks, io, presets."""
from dbnb.core.config.checks import (BLANK_CLASS_IMAGES, COMMON_CLASS_WORDS, check_schedule, class_word_warning,
                                     inbackward_conflicts, schedule_problems)
from dbnb.core.config.classimages import ClassImageSettings
from dbnb.core.config.declare import (FEW_PREVIEWS, LR_SCHEDULERS, QUALITY_NEGATIVE, SECTION_STEPS, SECTIONS, STEPS,
                                      ConfigError, setting)
from dbnb.core.config.evaluate import EvaluateSettings
from dbnb.core.config.io import RUN_KEYS, as_overrides, load_config, parse_override, read_config_file
from dbnb.core.config.model import ModelSettings
from dbnb.core.config.prep import PrepSettings
from dbnb.core.config.presets import FAMILY_DEFAULTS, FULL_FINE_TUNE_GIB, GUIDE_CHARACTER, PRESETS
from dbnb.core.config.train import TrainSettings
from dbnb.core.config.tuning import TuningSettings
from dbnb.core.config.whole import (FIELDS, FROZEN, FROZEN_GROUPS, GROUPS, Config, describe, field_type, from_dict,
                                    group_of, owner, section_fields, step_fields)

__all__ = [
    "BLANK_CLASS_IMAGES", "COMMON_CLASS_WORDS", "FAMILY_DEFAULTS", "FEW_PREVIEWS", "FIELDS", "FROZEN",
    "FROZEN_GROUPS", "FULL_FINE_TUNE_GIB", "GROUPS", "GUIDE_CHARACTER", "LR_SCHEDULERS", "PRESETS", "QUALITY_NEGATIVE", "RUN_KEYS", "SECTIONS", "SECTION_STEPS",
    "STEPS", "ClassImageSettings", "Config", "ConfigError", "EvaluateSettings", "ModelSettings", "PrepSettings",
    "TrainSettings", "TuningSettings", "as_overrides", "check_schedule", "class_word_warning", "describe",
    "field_type", "from_dict", "group_of", "inbackward_conflicts", "load_config", "owner", "parse_override",
    "read_config_file", "schedule_problems", "section_fields", "setting", "step_fields",
]
