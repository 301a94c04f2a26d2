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
