"""dbnb.core.platform, disk, hardware and dbnb.faces.doctor: platform detection, persistent storage, disk-space guard and `dbnb doctor`.

Everything runs on a CPU box without network: platforms are faked through `environ`,
a tmp `root` and fake modules in sys.modules; disk sizes through a fake disk_usage.
"""
from __future__ import annotations

import errno
import pickle
import shutil
import sys
import types
from collections import namedtuple
from dataclasses import FrozenInstanceError

import pytest
import torch

from dbnb.core import disk, hardware
from dbnb.core import platform as plat
from dbnb.core.disk import DiskFullError
from dbnb.core.hardware import Check
from dbnb.faces import doctor
from dbnb.faces.doctor import DoctorReport

GIB = 1024 ** 3
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def not_colab(monkeypatch):
    """Detection must not depend on whether google.colab happens to be installed here."""
    monkeypatch.setattr(plat, "_colab_importable", lambda: False)


@pytest.fixture
def no_kernel(monkeypatch, not_colab):
    monkeypatch.setattr(plat, "_in_notebook_kernel", lambda: False)


@pytest.fixture
def fake_disk(monkeypatch):
    """Pretend the disk has `free` bytes; records which path was asked about."""
    calls = []

    def install(free):
        def disk_usage(path):
            calls.append(path)
            return Usage(total=100 * GIB, used=100 * GIB - free, free=free)
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        return calls
    return install


def fake_ipython(monkeypatch, shell_class_name):
    shell = type(shell_class_name, (), {})()
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", module)


# --------------------------------------------------------------------------- platform

@pytest.mark.parametrize("environ, expected", [
    ({"COLAB_RELEASE_TAG": "release-colab_20240101"}, "colab"),
    ({"COLAB_GPU": "1"}, "colab"),
    ({"PAPERSPACE_NOTEBOOK_REPO_ID": "abc123"}, "paperspace"),
    ({"PAPERSPACE_METRIC_URL": "https://metrics.example"}, "paperspace"),
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "kaggle"),
    ({"HOME": "/root", "PATH": "/usr/bin"}, "terminal"),
])
def test_detect_platform_from_environ(no_kernel, tmp_path, environ, expected):
    assert plat.detect_platform(environ, root=tmp_path) == expected


def test_detect_paperspace_from_notebooks_and_storage_dirs(no_kernel, tmp_path):
    (tmp_path / "notebooks").mkdir()
    assert plat.detect_platform({}, root=tmp_path) == "terminal"  # one of the two is not enough
    (tmp_path / "storage").mkdir()
    assert plat.detect_platform({}, root=tmp_path) == "paperspace"


def test_detect_colab_when_google_colab_is_importable(monkeypatch, tmp_path):
    module = types.ModuleType("google.colab")
    module.__spec__ = plat.importlib.machinery.ModuleSpec("google.colab", None)
    monkeypatch.setitem(sys.modules, "google.colab", module)
    assert plat._colab_importable()
    assert plat.detect_platform({}, root=tmp_path) == "colab"


def test_detect_jupyter_only_inside_a_zmq_kernel(not_colab, monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert plat.detect_platform({}, root=tmp_path) == "terminal"

    fake_ipython(monkeypatch, "TerminalInteractiveShell")  # plain `ipython` in a terminal
    assert plat.detect_platform({}, root=tmp_path) == "terminal"

    fake_ipython(monkeypatch, "ZMQInteractiveShell")
    assert plat.detect_platform({}, root=tmp_path) == "jupyter"


def test_hosted_platforms_win_over_their_own_jupyter_kernel(not_colab, monkeypatch, tmp_path):
    fake_ipython(monkeypatch, "ZMQInteractiveShell")
    assert plat.detect_platform({"COLAB_GPU": "1"}, root=tmp_path) == "colab"
    assert plat.detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, root=tmp_path) == "kaggle"


def test_detect_platform_does_not_import_ipython(not_colab, monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    plat.detect_platform({}, root=tmp_path)
    assert "IPython" not in sys.modules


# --------------------------------------------------------------------------- storage

def test_persistent_dir_paperspace_prefers_writable_storage(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "storage").mkdir()
    assert plat.persistent_dir("paperspace", root=tmp_path) == tmp_path / "storage" / "dbnb"
    # detected from the same fake root when no platform is given
    monkeypatch.setattr(plat, "_colab_importable", lambda: False)
    for name in list(plat.os.environ):
        if name.startswith(("PAPERSPACE_", "COLAB_", "KAGGLE_")):
            monkeypatch.delenv(name)
    assert plat.persistent_dir(root=tmp_path) == tmp_path / "storage" / "dbnb"


def test_persistent_dir_paperspace_falls_back_to_notebooks(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    assert plat.persistent_dir("paperspace", root=tmp_path) == tmp_path / "notebooks" / "dbnb"

    (tmp_path / "storage").mkdir()
    # os.access is always True for root, so read-only /storage is faked at the helper.
    monkeypatch.setattr(plat, "_writable", lambda path: False)
    assert plat.persistent_dir("paperspace", root=tmp_path) == tmp_path / "notebooks" / "dbnb"


def test_persistent_dir_colab_needs_mounted_drive(tmp_path):
    assert not plat.drive_mounted(tmp_path)
    assert plat.persistent_dir("colab", root=tmp_path) is None

    (tmp_path / "content" / "drive" / "MyDrive").mkdir(parents=True)
    assert plat.drive_mounted(tmp_path)
    assert plat.persistent_dir("colab", root=tmp_path) == (
        tmp_path / "content" / "drive" / "MyDrive" / "dbnb")


@pytest.mark.parametrize("platform", ["kaggle", "jupyter", "terminal"])
def test_persistent_dir_none_elsewhere(tmp_path, platform):
    assert plat.persistent_dir(platform, root=tmp_path) is None


def test_mount_drive_outside_colab_raises_clearly(monkeypatch):
    monkeypatch.setattr(plat, "detect_platform", lambda: "terminal")
    with pytest.raises(RuntimeError, match=r"only works on Google Colab.*'terminal'"):
        plat.mount_drive()
    monkeypatch.setattr(plat, "detect_platform", lambda: "paperspace")
    with pytest.raises(RuntimeError, match="/storage"):
        plat.mount_drive()


def test_mount_drive_on_colab_calls_google_colab_drive(monkeypatch):
    mounted = []
    drive = types.ModuleType("google.colab.drive")
    drive.mount = mounted.append
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    monkeypatch.setattr(plat, "detect_platform", lambda: "colab")
    monkeypatch.setattr(plat, "drive_mounted", lambda root="/": False)

    path = plat.mount_drive()

    assert mounted == ["/content/drive"]
    assert str(path) == "/content/drive/MyDrive/dbnb"


# --------------------------------------------------------------------------- disk space

def test_free_disk_bytes_uses_nearest_existing_parent(tmp_path, fake_disk):
    calls = fake_disk(free=7 * GIB)
    missing = tmp_path / "runs" / "not" / "yet"
    assert disk.free_disk_bytes(missing) == 7 * GIB
    assert calls == [tmp_path]
    assert not (tmp_path / "runs").exists()  # asking must not create anything


def test_free_disk_bytes_on_the_real_disk(tmp_path):
    assert disk.free_disk_bytes(tmp_path / "missing" / "dir") > 0


def test_check_free_space_raises_with_numbers_path_and_advice(tmp_path, fake_disk):
    fake_disk(free=1 * GIB)
    with pytest.raises(DiskFullError) as caught:
        disk.check_free_space(tmp_path / "run", 3 * GIB, "checkpoint step 400")

    error = caught.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert (error.needed, error.free, error.path) == (3 * GIB, 1 * GIB, tmp_path)
    message = str(error)
    for part in ("checkpoint step 400", "3.00 GiB", "1.00 GiB", str(tmp_path), "Free some space"):
        assert part in message
    # survives pickling (accelerate / multiprocessing hand exceptions across processes)
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == message and clone.needed == 3 * GIB


def test_check_free_space_gives_the_callers_advice_and_asks_for_it_only_when_short(tmp_path, fake_disk):
    fake_disk(free=1 * GIB)
    asked = []
    with pytest.raises(DiskFullError, match=r"free at .*\. Delete step-000001\.$"):
        disk.check_free_space(tmp_path, 2 * GIB, "a checkpoint", lambda: asked.append(1) or "Delete step-000001.")
    assert disk.check_free_space(tmp_path, 1, "a byte", lambda: asked.append(2) or "") == 1 * GIB
    assert asked == [1]


def test_check_free_space_passes_when_it_fits(tmp_path, fake_disk):
    fake_disk(free=5 * GIB)
    assert disk.check_free_space(tmp_path, 5 * GIB, "export") == 5 * GIB


def test_check_free_space_on_the_real_disk(tmp_path):
    assert disk.check_free_space(tmp_path, 1, "a byte") > 0
    with pytest.raises(DiskFullError):
        disk.check_free_space(tmp_path, 1 << 60, "an exabyte")


@pytest.mark.parametrize("n, text", [(512, "512 B"), (1536, "1.50 KiB"),
                                     (3 * 1024 ** 2, "3.00 MiB"), (2048 * GIB, "2048.00 GiB")])
def test_format_bytes(n, text):
    assert disk.format_bytes(n) == text


# --------------------------------------------------------------------------- accelerators

@pytest.mark.parametrize("check, fallback", [
    (hardware.check_xformers, "scaled_dot_product_attention"),
    (hardware.check_bitsandbytes, "torch.optim.AdamW"),
])
def test_accelerators_not_usable_on_cpu_name_their_fallback(check, fallback):
    result = check("cpu")
    assert not result.ok and not result.required
    assert fallback in result.fallback
    assert result.detail  # says why: "not installed" here, "needs a CUDA GPU" if installed


def test_installed_xformers_on_cpu_needs_cuda(monkeypatch):
    xformers = types.ModuleType("xformers")
    xformers.__version__ = "0.0.99"
    xformers.ops = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", xformers.ops)

    result = hardware.check_xformers("cpu")

    assert not result.ok
    assert "0.0.99" in result.detail and "needs a CUDA GPU" in result.detail
    assert result.fallback == hardware.SDPA_FALLBACK


def test_broken_bitsandbytes_wheel_is_reported_not_raised(monkeypatch):
    class BrokenWheel:  # import hook that fails like a missing libbitsandbytes_cuda*.so
        def find_spec(self, name, path=None, target=None):
            if name == "bitsandbytes":
                raise OSError("libbitsandbytes_cuda121.so: cannot open shared object file\nmore")
            return None

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenWheel(), *sys.meta_path])

    result = hardware.check_bitsandbytes("cpu")

    assert not result.ok
    assert result.detail == ("not usable (OSError: libbitsandbytes_cuda121.so: "
                             "cannot open shared object file)")
    assert result.fallback == "torch.optim.AdamW"


def test_check_is_frozen_and_marks_its_severity():
    check = Check("x", False, "why")
    with pytest.raises(FrozenInstanceError):
        check.ok = True
    assert (Check("x", True, "").marker, check.marker,
            Check("x", False, "", required=True).marker) == ("✓", "!", "✗")


# --------------------------------------------------------------------------- doctor

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return doctor.run_doctor(tmp_path_factory.mktemp("out"))


def test_doctor_on_this_machine_is_ready(report):
    assert isinstance(report, DoctorReport)
    assert report.ok
    for name in ("python", *doctor.REQUIRED_PACKAGES):
        check = report.get(name)
        assert check is not None and check.required and check.ok, check
    assert report.get("torch").detail == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_doctor_reports_cpu_only_and_fallbacks(report):
    cuda = report.get("cuda")
    assert not cuda.ok and not cuda.required
    assert hardware.CPU_ONLY in cuda.detail
    assert hardware.cuda_summary() is None
    for name, fallback in (("xformers", hardware.SDPA_FALLBACK),
                           ("bitsandbytes", hardware.ADAMW_FALLBACK)):
        check = report.get(name)
        assert not check.ok and check.fallback == fallback

    text = report.format()
    assert hardware.CPU_ONLY in text
    assert hardware.SDPA_FALLBACK in text and hardware.ADAMW_FALLBACK in text
    assert text.splitlines()[-1].startswith("ready")


def test_doctor_covers_disk_ram_platform_and_storage(report):
    names = [check.name for check in report.checks]
    assert {"disk", "ram", "platform", "storage"} <= set(names)
    assert len(names) == len(set(names))
    assert report.get("platform").detail in ("colab", "paperspace", "kaggle", "jupyter", "terminal")
    assert "GiB" in report.get("ram").detail and "GiB" in report.get("disk").detail


def test_format_aligns_details_and_marks_each_check(report):
    lines = report.format().splitlines()
    check_lines = [line for line in lines if line[:1] in "✓✗!"]
    assert len(check_lines) == len(report.checks)
    columns = {line.index(check.detail) for line, check in zip(check_lines, report.checks)}
    assert len(columns) == 1
    for line, check in zip(check_lines, report.checks):
        assert line.startswith(f"{check.marker} {check.name}")


def test_required_check_failing_makes_doctor_not_ok(monkeypatch, tmp_path):
    real = doctor._package_version

    def broken(module):
        if module == "diffusers":
            raise ImportError("cannot import name 'cached_download' from 'huggingface_hub'")
        return real(module)

    monkeypatch.setattr(doctor, "_package_version", broken)
    report = doctor.run_doctor(tmp_path)

    assert not report.ok
    diffusers = report.get("diffusers")
    assert not diffusers.ok and diffusers.marker == "✗"
    assert "cached_download" in diffusers.detail and "pip install -U diffusers" in diffusers.detail
    assert report.get("torch").ok
    text = report.format()
    assert "✗ diffusers" in text
    assert text.splitlines()[-1] == "NOT READY: fix diffusers first (required)."


def test_optional_failures_do_not_block():
    report = DoctorReport([Check("python", True, "3.11", required=True),
                           Check("xformers", False, "not installed", fallback="SDPA")])
    assert report.ok
    assert report.format().splitlines() == [
        "✓ python    3.11",
        "! xformers  not installed",
        "            → will use SDPA",
        "ready (1 warning).",
    ]


def test_disk_warning_under_10_gib(tmp_path, fake_disk):
    fake_disk(free=2 * GIB)
    check = doctor._check_disk(tmp_path / "new_run")
    assert not check.ok and not check.required
    assert "2.00 GiB" in check.detail and str(tmp_path) in check.detail
    assert "output_dir" in check.detail

    fake_disk(free=50 * GIB)
    assert doctor._check_disk(tmp_path).ok


def test_colab_storage_warns_until_drive_is_mounted(monkeypatch):
    monkeypatch.setattr(plat, "drive_mounted", lambda root="/": False)
    check = doctor._check_storage("colab")
    assert not check.ok and "mount_drive()" in check.detail

    monkeypatch.setattr(plat, "drive_mounted", lambda root="/": True)
    check = doctor._check_storage("colab")
    assert check.ok and "/content/drive/MyDrive/dbnb" in check.detail


@pytest.mark.parametrize("card, bf16", [(("Tesla T4", 14.74, (7, 5)), False),
                                        (("NVIDIA L4", 22.05, (8, 9)), True)])
def test_doctor_says_bf16_by_compute_capability_not_torchs_emulation(fake_gpu, card, bf16, tmp_path):
    fake_gpu(*card)
    assert torch.cuda.is_bf16_supported()  # what torch >= 2.3 really answers on both
    assert hardware.cuda_summary()["bf16"] is bf16
    cuda = doctor.run_doctor(tmp_path).get("cuda")
    assert cuda.ok and card[0] in cuda.detail
    assert ("bf16 yes" if bf16 else "bf16 no (fp16 only)") in cuda.detail


def test_a_crashing_check_becomes_a_failed_line(monkeypatch, tmp_path):
    def explode():
        raise RuntimeError("CUDA driver version is insufficient\nlong traceback")

    monkeypatch.setattr(doctor, "cuda_summary", explode)
    report = doctor.run_doctor(tmp_path)
    cuda = report.get("cuda")
    assert not cuda.ok
    assert cuda.detail == "check failed (RuntimeError: CUDA driver version is insufficient)"
    assert report.ok  # CUDA is not required


def test_doctor_prints_the_stack_and_warns_outside_the_tested_range(monkeypatch, tmp_path):
    import diffusers

    from dbnb.core import versions
    assert f"diffusers {diffusers.__version__}" in doctor.run_doctor(tmp_path).get("versions").detail

    # the stack CI tested, whatever this environment has (a release newer than NEWEST_TESTED
    # is test_versions' business, not this test's)
    tested = {name: f"{series}.99" for name, series in versions.NEWEST_TESTED.items()}
    monkeypatch.setattr(versions, "installed_version", tested.get)
    fine = doctor.run_doctor(tmp_path).get("versions")
    assert fine.ok and not fine.required
    assert f"diffusers {tested['diffusers']}" in fine.detail and "matplotlib" in fine.detail

    monkeypatch.setattr(versions, "installed_version",
                        lambda name: "99.0.0" if name == "transformers" else tested.get(name))
    report = doctor.run_doctor(tmp_path)
    check = report.get("versions")
    assert not check.ok and check.marker == "!" and report.ok  # a warning, never a blocker
    assert "transformers 99.0.0 is newer than the newest tested" in check.detail
    assert "transformers 99.0.0" in report.format()
