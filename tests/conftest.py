"""Shared fixtures. Nothing here touches the network: models are the tiny SD 1.x model."""
import contextlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

# Belt and braces: a test that would reach the Hub fails instead of hanging or downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One CPU thread, here and in every process a test starts (kernels, CLI runs, DDP workers):
# with two, torch's CPU kernels sum in a varying order, so two identical tiny runs differ by
# ~1e-5 and the exact-resume / same-update tests fail at random; the tiny models are faster
# on one thread anyway. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The test command spreads the tests over CPU workers (pytest-xdist; setup.cfg: --dist loadfile,
# so a module-scoped fixture, a trained run, is made once). The session's world (world_folder,
# world_demo) is made once for all workers (shared_once). Its modules are the longest and go
# first, in this order (--no-loadscope-reorder): the first two workers take the demo and the
# world-effects side runs, which need only world_folder, and train them side by side.
# (--dist loadgroup cannot do it: xdist 3.8 marks a group in the node id, which pytest 9 no
# longer lets a plugin change, so every group silently fell back to one test at a time.)
WORLD_MODULES = ("test_cli.py", "test_world_effects.py", "test_world_lora.py", "test_report.py")
# Then the modules that take longest (about 40-200 s each on one worker, by --durations), so they start early
# instead of keeping one worker busy at the end; the rest in the order pytest found them.
LONG_MODULES = ("test_train.py", "test_lora.py", "test_notebooks.py", "test_browser.py", "test_gpu_suite.py",
                "test_merge.py")


def pytest_collection_modifyitems(config, items):
    first = WORLD_MODULES + LONG_MODULES
    items.sort(key=lambda item: first.index(item.path.name) if item.path.name in first else len(first))


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per test session even across xdist workers (the others wait for
    it under a file lock, then read what it wrote); returns the folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model as a diffusers folder (written once per test session)."""
    from dbnb.world.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """The tiny SDXL as a diffusers folder (written once per test session)."""
    from dbnb.world.tiny_sdxl import make_tiny_sdxl

    return shared_once(tmp_path_factory, "tiny-sdxl", make_tiny_sdxl)


@pytest.fixture(scope="session")
def source_copy(tmp_path_factory):
    """The checkout's files as a clean clone has them (git's view: tracked and not ignored), so a
    build here never writes build/ or dbnb.egg-info into the tree under test."""
    import shutil
    import subprocess

    root, copy = Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("source") / "dbnb-src"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True)
    names = [n for n in listed.stdout.split("\0") if n] if listed.returncode == 0 else None
    if not names:  # not a checkout of its own (an unpacked sdist, CI's copy inside an ignored folder)
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".venv*", "build", "dist", "*.egg-info", "__pycache__"))
        return copy
    for name in names:
        if (root / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, copy / name)
    return copy


@pytest.fixture(scope="session")
def built_wheel(source_copy):
    """dbnb's wheel, as README's `pip wheel . --no-deps -w dist/` makes it, built by the same
    setuptools backend without pip (pip's isolated build would fetch setuptools from the network)."""
    import subprocess
    import sys

    out = source_copy.parent / "dist"
    name = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                           f"print(b.build_wheel({str(out)!r}))"], cwd=source_copy, check=True,
                          capture_output=True, text=True).stdout.split()[-1]
    return out / name


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """dbnb's download / skeleton cache goes to the test's own folder."""
    monkeypatch.setenv("DBNB_CACHE", str(tmp_path / "dbnb-cache"))


@pytest.fixture(scope="session")
def embedders(tmp_path_factory):
    """Folders holding a tiny CLIP (+ the real CLIP BPE tokenizer) and a tiny DINO-style ViT."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from dbnb.family.sd1.skeleton import SKELETON

    root = tmp_path_factory.mktemp("embedders")
    layers = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **layers),
                         vision_config=dict(image_size=32, patch_size=8, **layers),
                         projection_dim=16)).save_pretrained(root / "clip")
    CLIPTokenizer.from_pretrained(SKELETON / "tokenizer").save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, **layers), add_pooling_layer=False).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy CI box OpenMP's waiting makes them
    10x slower; modules that render many tiny images use one thread."""
    with torch_threads(1):
        yield


@pytest.fixture
def fake_gpu(monkeypatch):
    """`fake_gpu(name, total_gib, capability)`: torch.cuda answers as on that card with torch >= 2.3,
    whose is_bf16_supported() counts emulation, so it says True on a T4 (compute 7.5) too."""
    import torch

    def install(name: str, total_gib: float, capability: tuple[int, int]):
        total = int(total_gib * 2**30)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - 2**28, total))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or capability >= (8, 0))

    return install


def dataset_with_class_images(folder, n_instance: int, class_per_instance: int, size: int = 64):
    """The demo's instance pictures and, as a quick stand-in for generated ones, fully transparent
    class images (the community's trick, written by dbnb's own transparent mode)."""
    from dbnb.prep.classimages import write_blank_images
    from dbnb.world.demo import write_dataset

    instance, klass = write_dataset(folder, n_instance=n_instance, size=size)
    write_blank_images(klass, n_instance * class_per_instance, size, progress=False)
    return instance, klass


@pytest.fixture
def make_config(tiny_dir, tmp_path):
    """A tiny run's Config on three pictures + class images: make_config(**overrides)."""
    instance, klass = dataset_with_class_images(tmp_path / "data", n_instance=3, class_per_instance=2)

    def make(**overrides):
        base = dict(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    class_data_dir=str(klass), instance_prompt="hnzk girl", class_prompt="girl",
                    output_dir=str(tmp_path / "runs"), run_name="run", resolution=64, max_train_steps=4,
                    save_every_steps=0, learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=0,
                    mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False,
                    # the UNet alone, as these runs were written for (the default trains the text encoder
                    # too, issue 30); tests of the text encoder set it themselves
                    train_text_encoder=False)
        from dbnb.core.config import Config
        return Config(**{**base, **overrides})
    return make


def assert_learnt_and_resumed_exactly(straight: Path, resumed: Path, base_weights: Path, step: int) -> None:
    """A full run's denoiser at `step`, resumed part-way (`resumed`), learnt (differs from the base's
    `base_weights` file) and is the same as the run that never stopped (`straight`)."""
    import torch
    from safetensors.torch import load_file

    from dbnb.run.checkpoints import RunFolder

    before = load_file(str(base_weights))
    after = RunFolder(resumed).pick(step).denoiser_state()
    assert set(after) == set(before) and any(not torch.equal(after[k].float(), before[k].float()) for k in before)
    uninterrupted = RunFolder(straight).pick(step).denoiser_state()
    for k in after:
        torch.testing.assert_close(after[k], uninterrupted[k], rtol=0, atol=1e-6, msg=k)


def assert_test_grids(run: Path, step: int) -> None:
    """The run's test grids render: the base model and checkpoint `step`, through its family's open() and pipeline()."""
    from dbnb.evaluate.sample import sample_run

    tests = sample_run(run, ["test_steps=" + str(step), "test_seeds=1", "test_infer_steps=2", "test_wide=0",
                             "test_flexibility_prompts=['{instance_prompt}, 1girl']"], progress=False)
    assert [r.name for r in tests.rows] == ["base", f"step-{step:06d}"] and tests.rendered
    assert tests.grids and all(grid.is_file() for grid in tests.grids)


def kill_9_at_step(cli: list[str], env: dict, log: Path, step: int) -> None:
    """Start `dbnb train` (`cli`) and kill -9 it once its train log reaches `step`, as a lost
    Colab session stops a run: no handler runs, nothing is saved."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not log.exists() or len(log.read_text().splitlines()) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"the run never reached step {step}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def two_checkpoint_run(tiny_dir, folder, **overrides):
    """A real 2-step run of the tiny model with a checkpoint at each step."""
    from dbnb.core.config import Config
    from dbnb.train.loop import train
    from dbnb.world.demo import CLASS_PROMPT, INSTANCE_PROMPT, write_dataset

    instance, _ = write_dataset(folder / "data", n_instance=3)
    config = Config(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT, output_dir=str(folder / "runs"),
                    run_name="run", resolution=64, max_train_steps=2, save_every_steps=1, sample_every_steps=0,
                    learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no",
                    use_8bit_adam=False, gradient_checkpointing=False,
                    **{"train_text_encoder": False, **overrides})  # the UNet alone unless asked (make_config)
    return train(config, progress=False).run_dir


@pytest.fixture
def http_server():
    """A web server on 127.0.0.1 in a thread, so the real downloaders run without the network.
    `routes[path] = (body, headers)`; a body that is a callable writes the response itself
    (to stall, or send more than it said). `hits` counts requests per path."""
    import http.server
    import threading

    routes, hits, release = {}, {}, threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path not in routes:
                self.send_error(404)
                return
            body, headers = routes[self.path]
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            if callable(body):
                self.end_headers()
                body(self.wfile, release)
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.routes, server.hits = routes, hits
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    release.set()  # a stalled handler returns
    server.shutdown()
    server.server_close()


@pytest.fixture
def drive(http_server, monkeypatch):
    """Google Drive served from 127.0.0.1, so the real gdown (5 or 6, whichever is installed) runs
    with its real signatures: only requests' transport is changed, sending what would go to
    drive.google.com / docs.google.com to `http_server`. `drive.file(name, data)` and
    `drive.folder(name, {path: data})` share something and return its link; a link to anything
    not shared gets Drive's answer for it (no file, a page instead)."""
    import hashlib
    import urllib.parse

    import requests

    real_send = requests.adapters.HTTPAdapter.send

    def send(self, request, *args, **kwargs):
        if urllib.parse.urlsplit(request.url).hostname in ("drive.google.com", "docs.google.com"):
            request.url = http_server.url + request.path_url
        return real_send(self, request, *args, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)

    def drive_id(name: str) -> str:  # Drive's ids are 25+ characters; gdown 6 relies on it
        return "1" + hashlib.sha256(name.encode()).hexdigest()[:32]

    def share_file(name: str, data: bytes, key: str = "") -> str:
        file_id = drive_id(key or name)
        quoted = urllib.parse.quote(name)
        http_server.routes[f"/uc?id={file_id}"] = (data, {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"attachment; filename=\"{name}\"; filename*=UTF-8''{quoted}"})
        return file_id

    def file(name: str, data: bytes) -> str:
        return f"https://drive.google.com/file/d/{share_file(name, data)}/view?usp=sharing"

    def folder(name: str, files: dict[str, bytes]) -> str:
        """One level of files; a path with a slash makes a subfolder."""
        folder_id = drive_id("folder:" + name)
        entries, subfolders = [], {}
        for path, data in files.items():
            head, _, rest = path.partition("/")
            if rest:
                subfolders.setdefault(head, {})[rest] = data
            else:
                entries.append((share_file(path, data, key=f"{name}/{path}"), path, "application/octet-stream"))
        for sub, content in subfolders.items():
            link = folder(f"{name}/{sub}", content)
            entries.append((urllib.parse.urlsplit(link).path.rsplit("/", 1)[1], sub, "application/vnd.google-apps.folder"))
        title = name.rsplit("/", 1)[-1]  # a subfolder's own name: gdown names its folder by the title
        # gdown 6 reads the embedded folder view: the title and one link per entry.
        links = "".join(
            f'<a href="https://drive.google.com/drive/folders/{i}">{n}</a>' if t.endswith("folder")
            else f'<a href="https://drive.google.com/file/d/{i}/view?usp=drive_web">{n}</a>' for i, n, t in entries)
        http_server.routes[f"/embeddedfolderview?id={folder_id}"] = (
            f"<html><head><title>{title}</title></head><body>{links}</body></html>".encode(),
            {"Content-Type": "text/html; charset=utf-8"})
        # gdown 5 reads the folder page: the title and the list in window['_DRIVE_ivd'].
        listing = json.dumps([[[i, None, n, t] for i, n, t in entries]])
        http_server.routes[f"/drive/folders/{folder_id}?hl=en"] = (
            (f"<html><head><title>{title} - Google Drive</title></head><body><script>"
             f"window['_DRIVE_ivd'] = '{listing}';</script></body></html>").encode(),
            {"Content-Type": "text/html; charset=utf-8"})
        return f"https://drive.google.com/drive/folders/{folder_id}?usp=sharing"

    return SimpleNamespace(file=file, folder=folder, server=http_server)


@pytest.fixture(scope="session")
def world_folder(tmp_path_factory):
    """The demo's world, made once per session: the pretrained world model, the instance
    pictures and the class images generated from it. Every world run trains beside it."""
    from dbnb.world.demo import DEMO_STEPS, demo_config, prepare_world

    def build(out):
        with torch_threads(1):  # see one_thread
            prepare_world(out, demo_config(out, DEMO_STEPS))
    return shared_once(tmp_path_factory, "world", build)


@pytest.fixture(scope="session")
def world_demo(world_folder, tmp_path_factory):
    """`dbnb demo` as a user types it, run once per session on world_folder: the scored run, its
    export and what it printed, read by the demo test and the world-effects tests."""
    from dbnb.faces.cli import main

    def build(folder):
        printed = io.StringIO()
        with torch_threads(1), contextlib.redirect_stdout(printed):
            code = main(["demo", "--out", str(world_folder)])
        folder.mkdir()
        (folder / "demo.json").write_text(json.dumps({"code": code, "printed": printed.getvalue()}))
    said = json.loads((shared_once(tmp_path_factory, "world-demo", build) / "demo.json").read_text())
    return SimpleNamespace(out=world_folder, run=world_folder / "runs" / "demo", code=said["code"],
                           printed=said["printed"])


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
