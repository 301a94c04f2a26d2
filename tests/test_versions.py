"""dbnb.core.versions: the declared range, its tested ends, and the loader keyword that was renamed."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from dbnb.core import versions

ROOT = Path(__file__).resolve().parent.parent


def oldest_pins() -> dict[str, Version]:
    lines = (ROOT / "constraints-oldest.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {versions._canonical(r.name): Version(str(r.specifier).removeprefix("==")) for r in pins}


def test_every_declared_dependency_has_a_newest_tested_and_nothing_else_does():
    assert set(versions.declared()) == set(versions.NEWEST_TESTED)
    assert {"torch", "diffusers", "transformers", "huggingface-hub", "pyyaml"} <= set(versions.declared())


def test_constraints_oldest_pins_each_declared_minimum():
    pins, declared = oldest_pins(), versions.declared()
    assert set(declared) <= set(pins)
    for name, specifier in declared.items():
        assert specifier.contains(pins[name]), (name, specifier, pins[name])
        if name == "torch":  # this machine's CPU wheel; on the platforms it is theirs
            continue
        minimum = next(Version(s.version) for s in specifier if s.operator == ">=")
        assert versions._series(pins[name]) == versions._series(minimum), name


def test_the_environment_running_the_tests_is_within_the_tested_range():
    problems = versions.outside_tested()
    # A release newer than NEWEST_TESTED is the platform moving, not dbnb breaking: CI says so
    # (pytest -ra lists the reason) and the rest of the suite is the test of it; once that passes,
    # raise the entry. Anything else (missing, outside the declared range, too old) fails.
    newer = [p for p in problems if "is newer than the newest tested" in p]
    assert problems == newer
    if newer:
        pytest.skip("; ".join(newer) + ": raise dbnb.core.versions.NEWEST_TESTED if the rest of the suite passes")


def test_a_release_newer_than_tested_is_reported_not_failed(monkeypatch):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: "1.99.0" if name == "accelerate" else real(name))
    with pytest.raises(pytest.skip.Exception, match=r"accelerate 1.99.0 is newer than the newest tested"):
        test_the_environment_running_the_tests_is_within_the_tested_range()
    monkeypatch.setattr(versions, "installed_version", lambda name: None if name == "accelerate" else real(name))
    with pytest.raises(AssertionError):
        test_the_environment_running_the_tests_is_within_the_tested_range()


def _stack(**changed):
    """The newest tested stack with `changed`: these tests hold whatever this environment has."""
    stack = {name: f"{series}.99" for name, series in versions.NEWEST_TESTED.items()}
    return {**stack, **changed}


def test_outside_tested_names_each_dependency_and_why():
    newest = versions.NEWEST_TESTED["transformers"]
    newer = f"{Version(newest).major}.{Version(newest).minor + 1}.0"
    problems = versions.outside_tested(_stack(transformers=newer, diffusers="0.29.0", gdown=None,
                                              torch="2.5.0"))
    text = "\n".join(problems)
    assert len(problems) == 4
    assert f"transformers {newer} is newer than the newest tested ({newest}.x)" in text
    assert "diffusers 0.29.0 is outside what dbnb declares (>=0.30)" in text
    assert "gdown is not installed" in text
    assert f"torch 2.5.0 is older than the oldest tested ({versions.OLDEST_TESTED['torch']})" in text


def test_a_patch_release_of_a_tested_series_counts_as_tested():
    newest = versions.NEWEST_TESTED["diffusers"]
    assert versions.outside_tested(_stack(diffusers=f"{newest}.99")) == []
    assert versions.outside_tested(_stack(torch="2.13.0+cu128")) == []


@pytest.mark.parametrize("library, before, after", [("diffusers", "0.39.0", "0.40.0"),
                                                     ("transformers", "4.55.4", "4.56.0")])
def test_dtype_argument_follows_the_rename(monkeypatch, library, before, after):
    import torch

    monkeypatch.setattr(versions, "installed_version", lambda name: before)
    assert versions.dtype_argument(library, torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(versions, "installed_version", lambda name: after)
    assert versions.dtype_argument(library, torch.float16) == {"dtype": torch.float16}


# --- the declared torch floor is true ---------------------------------------------------------

# torch names dbnb could reach for, and the release that added each. Used without a feature
# check (hasattr, or getattr with a default) where the name is newer than setup.cfg's floor,
# one breaks that floor: on an older torch it raises AttributeError — in an `except` clause,
# in place of the error being handled.
TORCH_ADDED = {
    "torch.OutOfMemoryError": "2.5",  # torch.cuda.OutOfMemoryError (1.13) is the same class
    "torch.nn.utils.get_total_norm": "2.6",  # pytorch#139662
    "torch.nn.utils.clip_grads_with_norm_": "2.6",  # pytorch#139662
    "torch.accelerator": "2.6",
    "torch.amp.GradScaler": "2.3",  # torch.cuda.amp.GradScaler before
    "torch.get_default_device": "2.3",
    "torch.serialization.add_safe_globals": "2.4",
}


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _hasattr_checks(test) -> set[str]:
    """The names `hasattr(x, "name")` calls in an if's test check, as `x.name`."""
    return {f"{_dotted(c.args[0])}.{c.args[1].value}" for c in ast.walk(test)
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "hasattr"
            and len(c.args) == 2 and isinstance(c.args[1], ast.Constant)}


def unguarded_torch_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of each TORCH_ADDED name used in `source` outside an `if` (or `x if … else`,
    or `… and …`) that checks it with hasattr first."""
    tree = ast.parse(source)
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            checked = _hasattr_checks(node.test)
            body = node.body if isinstance(node.body, list) else [node.body]
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
            checked, body = set().union(*map(_hasattr_checks, node.values[:-1])), node.values[1:]
        else:
            continue
        guarded |= {id(inner) for part in body for inner in ast.walk(part)
                    if checked and _dotted(inner) in checked}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node) in TORCH_ADDED and id(node) not in guarded:
            found.append((node.lineno, _dotted(node)))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if f"{node.module}.{a.name}" in TORCH_ADDED]
    return sorted(found)


def test_the_floor_check_sees_a_bare_use_and_lets_a_feature_check_pass():
    source = textwrap.dedent("""\
        import torch
        try:
            pass
        except torch.OutOfMemoryError:
            pass
        if hasattr(torch, "accelerator"):
            torch.accelerator.current_accelerator()
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)
        scaler = torch.amp.GradScaler() if hasattr(torch.amp, "GradScaler") else None
        from torch.nn.utils import clip_grads_with_norm_
        torch.get_default_device()
        """)
    assert unguarded_torch_names(source) == [(4, "torch.OutOfMemoryError"),
                                             (10, "torch.nn.utils.clip_grads_with_norm_"),
                                             (11, "torch.get_default_device")]


def test_dbnb_uses_no_torch_name_newer_than_the_declared_floor():
    floor = next(Version(s.version) for s in versions.declared()["torch"] if s.operator == ">=")
    too_new = [f"{path.relative_to(ROOT)}:{line}: {name} (torch {TORCH_ADDED[name]})"
               for path in sorted((ROOT / "dbnb").rglob("*.py"))
               for line, name in unguarded_torch_names(path.read_text(encoding="utf-8"))
               if Version(TORCH_ADDED[name]) > floor]
    assert not too_new, (f"setup.cfg declares torch>={floor}, but these need a newer torch: raise the "
                         f"floor, or check for the name first (hasattr / getattr): {too_new}")


def test_the_trainer_version_names_this_checkouts_commit():
    """What a run records as its DBモデルハッシュ: the version, and the commit of the running code."""
    import shutil
    import subprocess

    from dbnb import __version__
    from dbnb.core.versions import dbnb_version

    root = Path(__file__).resolve().parents[1]
    if not shutil.which("git") or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert dbnb_version().startswith(f"dbnb {__version__}, commit {head}")
