"""Shared fixtures. Nothing here touches the network: models are the tiny SD 1.x model."""
import contextlib
import io
import os
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


# The test command spreads the tests over CPU workers (pytest-xdist, --dist loadgroup). Each
# module's tests stay on one worker, so a module-scoped fixture (a trained run) is made once;
# every test using the session's world (a trained demo run) goes to one worker too.
SHARED_WORLD = {"world_folder", "world_demo"}


def pytest_collection_modifyitems(config, items):
    uses_world = {item.nodeid: bool(SHARED_WORLD & set(getattr(item, "fixturenames", ()))) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("world" if uses_world[item.nodeid] else item.nodeid.split("::")[0]))
    # The world's tests are the longest chain on one worker: started first, the other workers
    # share out the rest meanwhile instead of waiting for it at the end.
    items.sort(key=lambda item: not uses_world[item.nodeid])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model as a diffusers folder (written once per test session)."""
    from dbnb.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """dbnb's download / skeleton cache goes to the test's own folder."""
    monkeypatch.setenv("DBNB_CACHE", str(tmp_path / "dbnb-cache"))


@pytest.fixture(scope="session")
def embedders(tmp_path_factory):
    """Folders holding a tiny CLIP (+ the real CLIP BPE tokenizer) and a tiny DINO-style ViT."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from dbnb.skeleton import SKELETON

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
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dataset_with_class_images(folder, n_instance: int, class_per_instance: int, size: int = 64):
    """The demo's instance pictures and, as a quick stand-in for generated ones, fully transparent
    class images (the community's trick, written by dbnb's own transparent mode)."""
    from dbnb.classimages import write_blank_images
    from dbnb.demo import write_dataset

    instance, klass = write_dataset(folder, n_instance=n_instance, size=size)
    write_blank_images(klass, n_instance * class_per_instance, size, progress=False)
    return instance, klass


def two_checkpoint_run(tiny_dir, folder, **overrides):
    """A real 2-step run of the tiny model with a checkpoint at each step."""
    from dbnb.config import Config
    from dbnb.demo import CLASS_PROMPT, INSTANCE_PROMPT, write_dataset
    from dbnb.train import train

    instance, _ = write_dataset(folder / "data", n_instance=3)
    config = Config(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT, output_dir=str(folder / "runs"),
                    run_name="run", resolution=64, max_train_steps=2, save_every_steps=1, sample_every_steps=0,
                    learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no",
                    use_8bit_adam=False, gradient_checkpointing=False, **overrides)
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


@pytest.fixture(scope="session")
def world_folder(tmp_path_factory):
    """The demo's world, made once per session: the pretrained world model, the instance
    pictures and the class images generated from it. Every world run trains beside it."""
    import torch

    from dbnb.demo import DEMO_STEPS, demo_config, prepare_world

    out = tmp_path_factory.mktemp("world") / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    try:
        prepare_world(out, demo_config(out, DEMO_STEPS))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def world_demo(world_folder):
    """`dbnb demo` as a user types it, run once per session on world_folder: the scored run, its
    export and what it printed, read by the demo test and the world-effects tests."""
    import torch

    from dbnb.cli import main

    printed = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            code = main(["demo", "--out", str(world_folder)])
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(out=world_folder, run=world_folder / "runs" / "demo", code=code,
                           printed=printed.getvalue())
