"""Class-image generation speed (images/s) through dbnb.prep.classimages.generate_class_images.

Default: the tiny model at 64 px (runs anywhere, a smoke figure). `--full`: an SD 1.5-size
model (random weights from the shipped config, no download) at 512 px, 28 steps, CFG 12,
DPM++ 2M, the seed's class-image settings; on a GPU that is fp16 + SDPA with the batch size
chosen from free VRAM, the figure the regularization notebook quotes. The pipeline is built
in memory (so loading is not timed) and one batch is generated first as a warm-up.

    python bench/bench_classimages.py [--full] [--count 16] [--batch-size 0] [--sampler dpmpp_2m]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dbnb.family.render import SAMPLERS
from dbnb.family.sd1.family import SD1


def build_pipeline(full: bool):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from dbnb.family.sd1.skeleton import SKELETON, skeleton_config
    from dbnb.world.tiny import build_components, build_tiny_pipeline

    if not full:
        return build_tiny_pipeline()
    unet, vae, text_encoder = build_components(skeleton_config("unet"), skeleton_config("vae"),
                                               skeleton_config("text_encoder"))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(SKELETON / "tokenizer", model_max_length=77),
        scheduler=PNDMScheduler.from_config(skeleton_config("scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def main():
    from dbnb.core.config import Config
    from dbnb.prep import classimages as ci

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD 1.5-size model at 512 px (needs a GPU to be quick)")
    parser.add_argument("--count", type=int, default=16, help="images to time (default 16)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: dbnb's automatic choice")
    parser.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int, default=None, help="default: 28 (--full) or 4 (tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (--full) or 64 (tiny)")
    args = parser.parse_args()

    steps = args.steps or (28 if args.full else 4)
    resolution = args.resolution or (512 if args.full else 64)
    t = time.time()
    pipe = build_pipeline(args.full)
    built = time.time() - t
    with tempfile.TemporaryDirectory(prefix="dbnb-bench-class-") as tmp:
        config = Config(pretrained_model_name_or_path="(built in memory)", class_prompt="1girl",
                        class_data_dir=str(Path(tmp) / "warmup"), num_class_images=1, resolution=resolution,
                        class_infer_steps=steps, class_sampler=args.sampler, class_batch_size=args.batch_size,
                        mixed_precision="fp16" if torch.cuda.is_available() else "no")
        models = SD1.models_of(pipe)
        ci.load_generation_pipeline(config, models)  # on the device, in the dtype, before the free VRAM is read
        batch = ci.pick_batch_size(config, *ci.generation_device_dtype(config))
        config = config.replace(num_class_images=min(batch, args.count))
        ci.generate_class_images(config, progress=False, models=models)  # warm-up: kernels, allocator
        config = config.replace(class_data_dir=str(Path(tmp) / "timed"), num_class_images=args.count)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t = time.time()
        written = ci.generate_class_images(config, progress=True, models=models)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.time() - t
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = f", peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
    model = "SD 1.5-size (random weights)" if args.full else "tiny"
    print(f"{model} model built in {built:.1f} s; {device}, {str(pipe.unet.dtype).replace('torch.', '')}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"class images: {len(written)} at {resolution}x{resolution}, {steps} steps, "
          f"{SAMPLERS[args.sampler][1]}, CFG {config.class_guidance_scale:g}, batch {batch}: "
          f"{seconds:.2f} s, {len(written) / seconds:.2f} images/s{peak}")


if __name__ == "__main__":
    main()
