"""Full-size check of dbnb.family.sd1.layout: random-weight SD 1.5 → original layout → fp16 file → diffusers.

Not a test (≈1 min, several GB of RAM). Run: python bench/bench_layout.py [--keep DIR]

A real SD 1.5 single file has 686 UNet, 248 VAE and 196 text-encoder weight tensors in the
original layout (196 without `position_ids`); the script asserts those counts, prints the
mapping time and peak RSS, then writes fp16 .safetensors and loads it back with diffusers'
own `StableDiffusionPipeline.from_single_file`, comparing tensors through the mapping.
"""
from __future__ import annotations

import argparse
import os

# diffusers / huggingface_hub read this once, at import: nothing here may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from dbnb.family.sd1.layout import (ORIGINAL_PREFIXES, original_state_dict, text_encoder_key_map, unet_key_map,
                                    vae_key_map, write_single_file)
from dbnb.family.sd1.skeleton import SKELETON, skeleton_config
from dbnb.world.tiny import build_components

KEY_MAPS = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map}
EXPECTED = {"unet": 686, "vae": 248, "text_encoder": 196}
# (component, diffusers key, original key) spot checks after the round trip; the VAE one
# crosses the Linear ↔ 1x1-conv reshape.
SPOT_CHECKS = [
    ("unet", "conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"),
    ("unet", "up_blocks.1.upsamplers.0.conv.weight",
     "model.diffusion_model.output_blocks.5.2.conv.weight"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
     "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
    ("vae", "decoder.mid_block.attentions.0.to_q.weight",
     "first_stage_model.decoder.mid.attn_1.q.weight"),
    ("vae", "decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
     "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"),
    ("text_encoder", "encoder.layers.11.mlp.fc2.weight",
     "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"),
]


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident set size in GiB."""
    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return psutil.Process().memory_info().rss / 2**30, peak_kib / 2**20


def log(message: str) -> None:
    now, peak = rss_gib()
    print(f"{message}  [rss {now:.2f} GiB, peak {peak:.2f} GiB]", flush=True)


def count_per_prefix(state: dict) -> dict[str, int]:
    return {name: sum(key.startswith(prefix) for key in state)
            for name, prefix in ORIGINAL_PREFIXES.items()}


def compare_round_trip(path: Path, written: dict[str, torch.Tensor]) -> None:
    from diffusers import StableDiffusionPipeline

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(SKELETON), local_files_only=True, safety_checker=None)
    log(f"from_single_file: {time.perf_counter() - start:.1f} s")
    for component, diffusers_key, original_key in SPOT_CHECKS:
        loaded = getattr(pipe, component).state_dict()[diffusers_key]
        expected = written[original_key].reshape(loaded.shape).to(loaded.dtype)
        assert torch.equal(loaded, expected), (component, diffusers_key)
        print(f"  equal: {component}.{diffusers_key} == {original_key} {tuple(loaded.shape)}")
    # Beyond the spot checks: every tensor of every component must have come from the file.
    for component, key_map in KEY_MAPS.items():
        loaded = getattr(pipe, component).state_dict()
        for diffusers_key, original_key in key_map(loaded).items():
            tensor = loaded[diffusers_key]
            expected = written[original_key].reshape(tensor.shape).to(tensor.dtype)
            assert torch.equal(tensor, expected), (component, diffusers_key)
        # from_single_file without torch_dtype upcasts the fp16 file to float32.
        print(f"  all {len(loaded)} {component} tensors equal (loaded as {tensor.dtype})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the .safetensors here and keep it")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    start = time.perf_counter()
    models = build_components(skeleton_config("unet"), skeleton_config("vae"),
                              skeleton_config("text_encoder"))
    log(f"built SD 1.5 components (random weights): {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    state = original_state_dict(*(model.state_dict() for model in models))
    log(f"original_state_dict: {time.perf_counter() - start:.3f} s for {len(state)} tensors")
    counts = count_per_prefix(state)
    print("counts per prefix:", ", ".join(f"{name}={n} ({ORIGINAL_PREFIXES[name]})"
                                          for name, n in counts.items()))
    assert counts == EXPECTED, counts
    assert len(state) == sum(EXPECTED.values())

    # fp16 as webui users expect; drop the fp32 models first so peak RSS stays ≈ one model.
    half = {key: value.half() for key, value in state.items()}
    del state, models
    log("converted to fp16")

    with tempfile.TemporaryDirectory(prefix="dbnb-bench-") as tmp:
        folder = args.keep or Path(tmp)
        start = time.perf_counter()
        path = write_single_file(folder / "sd15-random-fp16.safetensors", half,
                                 metadata={"dbnb_bench": "layout"})
        log(f"write_single_file: {time.perf_counter() - start:.1f} s, "
            f"{path.stat().st_size / 2**30:.2f} GiB on disk")
        compare_round_trip(path, half)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
