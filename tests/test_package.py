"""What users install: the wheel (Colab: built once, put on Drive, installed by the notebooks'
install cell) and the sdist hold every file the package reads. Editable installs read the
source tree, so nothing else in the suite can see a data file the build leaves out."""
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_files() -> set[str]:
    """Every file of the package as the source tree has it (code and data), relative to ROOT."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "dbnb").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_the_wheel_holds_every_file_of_the_package(built_wheel):
    with zipfile.ZipFile(built_wheel) as z:
        held = {n for n in z.namelist() if n.startswith("dbnb/")}
    missing = sorted(package_files() - held)
    assert not missing, f"the wheel lacks {missing}: setup.cfg [options.package_data]"
    assert any(n.endswith("assets/sd15/unet/config.json") for n in held)  # what 04's export reads


def test_the_sdist_holds_every_file_of_the_package(tmp_path, source_copy):
    out = tmp_path / "sdist"
    name = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           f"print(b.build_sdist({str(out)!r}))"], cwd=source_copy, check=True,
                          capture_output=True, text=True).stdout.split()[-1]
    with tarfile.open(out / name) as t:
        held = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    missing = sorted(package_files() - held)
    assert not missing, f"the sdist lacks {missing}"
