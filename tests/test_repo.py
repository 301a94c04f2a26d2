"""The repository's own promises: the README's commands are what CI and users run."""
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
