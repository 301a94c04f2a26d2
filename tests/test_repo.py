"""The repository's own promises: the README's commands are what CI and users run."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    demo, tests = readme_commands()
    assert demo.endswith("dbnb demo") and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests, "the last line of .ci/run is the README's test command, exactly"
    assert sum(tests in line for line in ci) == 1


def test_cpu_install_pins_the_local_cpu_torch():
    for command in readme_commands():
        assert '"torch==2.13.0"' in command


def test_only_the_checkpoint_class_spells_a_checkpoints_layout():
    """Train, sample, score, export and report ask a Checkpoint; none builds its paths. And no
    state dict is loaded with strict=False, which would hide a wrong file."""
    for path in sorted((ROOT / "dbnb").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name != "checkpoints.py":
            assert "unet_ema" not in text, path
            assert '"state" /' not in text and "/ \"state\"" not in text, path
        assert "strict=False" not in text, path


# Top to bottom: a folder may import the folders after it, never one before it. The README's
# "Layout" section draws the same order.
LAYERS = ("faces", "world", "ship", "evaluate", "train", "prep", "run", "data", "family", "core")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("dbnb.")}


def test_each_folder_imports_only_the_folders_below_it():
    package = ROOT / "dbnb"
    assert {p.name for p in package.glob("*.py")} == {"__init__.py", "__main__.py"}, "every module lives in a layer"
    assert {p.name for p in package.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS)
    wrong = []
    for path in sorted(package.rglob("*.py")):
        layer = path.relative_to(package).parts[0]
        if layer not in LAYERS:
            continue
        for name in imported_modules(path):
            target = name.split(".")[1]
            if target in LAYERS and LAYERS.index(target) < LAYERS.index(layer):
                wrong.append(f"{path.relative_to(ROOT)} imports {name} ({target} is above {layer})")
    assert not wrong, "\n".join(wrong)


def test_each_folder_says_its_job_in_one_line():
    for folder in sorted((ROOT / "dbnb").rglob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(folder.read_text(encoding="utf-8")))
        assert doc, f"{folder.relative_to(ROOT)}: no docstring saying what the folder is for"
        if folder.parent.name != "prep":  # prep's package docstring is also its usage guide
            assert len(doc.splitlines()) == 1, f"{folder.relative_to(ROOT)}: the job in one line"
