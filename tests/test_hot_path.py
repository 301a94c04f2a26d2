"""The training step's hot path (issue 29, item 9), on the tiny model through the real trainer:
one host read per optimizer step, pictures as uint8 freed once cached, each file decoded once,
EMA with foreach, and the pre-save scan in one fused pass."""
import collections
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dbnb.data import dataset as data
from dbnb.data.batches import gather_examples, read_images
from dbnb.train.divergence import first_non_finite
from dbnb.train.loop import train

pytestmark = pytest.mark.own_logic  # how dbnb drives the step, not what a library's API does

# Every way Python reads a tensor's value on the host; on a GPU each one waits for the queued work.
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
# Reads of host-only tensors by design: each epoch's shuffle is a CPU generator's randperm,
# read once per epoch; it never holds a device value.
HOST_SIDE = {"epoch_order"}


class HostReads:
    """Counts host reads of tensor values (and torch.cuda.synchronize) while `on`, with where each
    came from. The wrappers call the real methods: the run computes what it always does."""

    def __init__(self, monkeypatch):
        self.on, self.seen = False, []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._counting("synchronize", torch.cuda.synchronize))

    def _counting(self, name, real):
        def read(*args, **kwargs):
            if self.on:
                caller = sys._getframe(1).f_code
                if caller.co_name not in HOST_SIDE:
                    self.seen.append(f"{name} in {caller.co_name} ({Path(caller.co_filename).name})")
            return real(*args, **kwargs)
        return read


def _session_of(monkeypatch) -> dict:
    """The Session the real loop runs on, noted as the loop starts (the loop itself runs as is)."""
    from dbnb.train import loop as train_module

    real, seen = train_module.loop, {}
    monkeypatch.setattr(train_module, "loop", lambda s, *a, **k: real(seen.setdefault("s", s), *a, **k))
    return seen


@pytest.mark.parametrize("name, settings", [
    ("full: EMA, clipping, accumulation, text encoder, class images",
     dict(use_ema=True, max_grad_norm=1.0, gradient_accumulation_steps=2, hflip=True, train_text_encoder=True,
          with_prior_preservation=True, num_class_images=6)),
    ("LoRA, live latents, alpha mask", dict(use_lora=True, lora_rank=4, lora_text_encoder_rank=4, use_ema=True,
                                            cache_latents=False, alpha_mask_loss=True, hflip=True)),
    ("optimizer in backward", dict(optimizer_in_backward=True, max_grad_norm=0.0)),
    ("bf16 autocast", dict(mixed_precision="bf16", use_ema=True, max_grad_norm=1.0)),
    ("aspect buckets, live latents", dict(bucketing=True, cache_latents=False, hflip=True, with_prior_preservation=True,
                                          num_class_images=6)),
])
def test_an_optimizer_step_reads_from_the_device_once(make_config, monkeypatch, name, settings):
    reads, steps = HostReads(monkeypatch), 8

    def window(record):  # from the end of step 2 to the end of the last: whole steps, warm
        reads.on = 2 <= record["step"] < steps
    train(make_config(max_train_steps=steps, run_name="reads", **settings), progress=False, on_step=window)
    per_step = collections.Counter(reads.seen)
    assert len(reads.seen) == steps - 2, f"{name}: {len(reads.seen) / (steps - 2):.2f} reads per step: {per_step}"
    assert list(per_step) == ["tolist in agree_on_stops (loop.py)"]  # loss, norm and stop flags together


def test_pictures_are_held_as_uint8_and_freed_once_their_latents_are_cached(make_config, monkeypatch):
    seen = _session_of(monkeypatch)
    train(make_config(with_prior_preservation=True, num_class_images=6, max_train_steps=2), progress=False)
    batches = seen.pop("s").batches
    assert batches.latents is not None and batches.instance.images is None and batches.klass.images is None
    # Without the latent cache the loop reads them each step: kept, a byte per channel.
    train(make_config(cache_latents=False, max_train_steps=2, run_name="live"), progress=False)
    images = seen["s"].batches.instance.images
    assert images.dtype == torch.uint8 and images.nbytes == 3 * 3 * 64 * 64


def test_each_picture_file_is_decoded_once_and_trains_as_read_from_the_file(make_config, tiny_dir, monkeypatch):
    from PIL import Image, ImageDraw
    from transformers import CLIPTokenizer

    config = make_config(alpha_mask_loss=True, hflip=True)
    cut = Image.new("RGBA", (80, 64), (200, 30, 30, 255))  # not square, half transparent
    ImageDraw.Draw(cut).rectangle((0, 0, 39, 63), fill=(0, 0, 0, 0))
    cut.save(Path(config.instance_data_dir) / "cut.png")
    real, opened = Image.open, collections.Counter()
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.update([Path(fp).name]) or real(fp, *a, **k))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    examples = gather_examples(config)
    batches = read_images(config, tokenizer, examples)
    names = [e.path.name for e in examples[0]]
    assert "cut.png" in names and opened == {n: 1 for n in names}, opened
    # the same pixels and masks as reading each file afresh, and the examples no longer hold them
    fresh = data.ImageSet([replace(e, held=None) for e in examples[0]], tokenizer, 64, config.center_crop,
                          config.background_color, True, alpha_mask=True)
    assert torch.equal(batches.instance.images, fresh.images) and torch.equal(batches.instance.masks, fresh.masks)
    square = data.to_square(data.load_rgb(Path(config.instance_data_dir) / "cut.png"), 64, config.center_crop)
    assert np.array_equal(batches.instance.images[names.index("cut.png")].permute(1, 2, 0).numpy(),
                          np.asarray(square))
    assert all(e.held.take() is None for e in examples[0])


def test_the_ema_updates_all_its_tensors_at_once(make_config, monkeypatch):
    seen = _session_of(monkeypatch)
    result = train(make_config(use_ema=True, ema_decay=0.5, max_train_steps=2), progress=False)
    assert seen["s"].ema.foreach  # diffusers' EMAModel: one fused update, not a kernel launch per tensor
    from dbnb.run.folder import RunFolder
    raw, ema = (RunFolder(result.run_dir).pick(2).denoiser_state(e) for e in (False, True))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_the_pre_save_scan_names_the_first_bad_part_in_one_host_read(monkeypatch):
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # finite; its sum or L2 norm would overflow fp16
    parts = {"UNet weights": [torch.randn(3, 3), big, torch.empty(0)],
             "EMA weights": [torch.ones(4, dtype=torch.bfloat16), torch.randn(5)],
             "text encoder weights": [],
             "optimizer state": [torch.zeros(6), torch.ones(2, dtype=torch.float64)]}
    reads = HostReads(monkeypatch)
    reads.on = True
    assert first_non_finite(parts) == ""
    assert len(reads.seen) == 1, reads.seen
    parts["optimizer state"][1][1] = float("inf")
    assert first_non_finite(parts) == "optimizer state"
    parts["EMA weights"][0][2] = float("nan")
    assert first_non_finite(parts) == "EMA weights"  # the first in order
    big[7] = float("-inf")
    assert first_non_finite(parts) == "UNet weights"
    assert len(reads.seen) == 4


def test_host_copies_to_the_cpu_are_plain_and_equal():
    from dbnb.data.batches import to_device

    t = torch.randn(2, 3)
    assert to_device(t, "cpu") is t  # nothing to copy, nothing pinned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_to_gpu_copies_are_from_pinned_memory_without_waiting(monkeypatch):
    from dbnb.data.batches import to_device

    pinned, copies = [], []
    real_pin, real_to = torch.Tensor.pin_memory, torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(1) or real_pin(t, *a))
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda t, *a, **k: copies.append(k.get("non_blocking")) or real_to(t, *a, **k))
    t = torch.randn(64, 64)
    out = to_device(t, "cuda")
    assert pinned == [1] and copies == [True] and torch.equal(out.cpu(), t)
