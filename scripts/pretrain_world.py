"""Reproduce the tiny pretrained world model shipped in dbnb/assets/world/.

    python scripts/pretrain_world.py [--out dbnb/assets/world] [--vae-steps N] [--unet-steps N]

Seeded end to end: the same torch version and thread count give the same weights. Two
stages, as Stable Diffusion was built: a VAE on world images (reconstruction + a small KL
term), then the UNet and the CLIP text encoder together on the VAE's latents with the
captions (epsilon prediction, SD 1.5's noise schedule, 10% empty captions so
classifier-free guidance works). The topology is SD 1.5's at small widths (dbnb.world.tiny), so
the result loads, trains and exports through the same paths as a real SD 1.x model.
"""
from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dbnb.evaluate.scorers import world
from dbnb.family.sd1 import skeleton
from dbnb.world import tiny

ROOT = Path(__file__).resolve().parents[1]


def images_and_captions(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    pairs = list(world.dataset(n, seed=seed))
    pixels = np.stack([np.asarray(image) for image, _ in pairs])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [c for _, c in pairs]


def log(stage: str, step: int, total: int, loss: float, started: float) -> None:
    print(f"[{stage}] step {step}/{total} loss {loss:.4f} {time.time() - started:.0f}s", flush=True)


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    started = time.time()
    for step in range(1, steps + 1):
        b = x[torch.randint(len(x), (batch,), generator=g)]
        posterior = vae.encode(b).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        # KL kept small, as SD's VAE does: the latents stay detailed, their scale is fixed below.
        loss = F.mse_loss(recon, b) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log("vae", step, steps, loss.item(), started)


@torch.no_grad()
def encode(vae, x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([vae.encode(x[i:i + 256]).latent_dist.sample(generator=g) for i in range(0, len(x), 256)])


def train_unet(unet, text_encoder, tokenizer, latents, captions, steps: int, batch: int, seed: int) -> None:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(skeleton.skeleton_config("scheduler"))
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    started = time.time()
    for step in range(1, steps + 1):
        pick = torch.randint(len(latents), (batch,), generator=g)
        tokens = ids[pick].clone()
        for i in range(batch):
            if rng.random() < 0.1:
                tokens[i] = empty
        z = latents[pick]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log("unet", step, steps, loss.item(), started)


def save(out: Path, unet, vae, text_encoder) -> None:
    """fp16 weights (a few MB) + configs; dbnb.world.tiny.make_world_model loads them as fp32."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        model.to(torch.float16).save_pretrained(tmp / name, safe_serialization=True)
        model.to(torch.float32)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dbnb" / "assets" / "world")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vae-from", type=Path, help="a trained VAE folder: skip stage 1")
    parser.add_argument("--vae-only", action="store_true", help="stop after stage 1 (saves OUT/vae)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    pipe = tiny.build_world_pipeline(seed=args.seed)
    x, captions = images_and_captions(args.images, args.seed)
    print(f"{len(x)} world images drawn in {time.time() - started:.0f}s", flush=True)

    if args.vae_from:
        from diffusers import AutoencoderKL
        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32)
    else:
        train_vae(pipe.vae, x, args.vae_steps, batch=16, seed=args.seed)
    if args.vae_only:
        pipe.vae.save_pretrained(args.out / "vae")
        return
    latents = encode(pipe.vae, x, args.seed)
    # SD's convention: latents scaled to unit variance (SD 1.5's own factor is 0.18215).
    pipe.vae.register_to_config(scaling_factor=round(float(1 / latents.std()), 5))
    latents = latents * pipe.vae.config.scaling_factor
    print(f"vae scaling_factor {pipe.vae.config.scaling_factor:.4f}", flush=True)

    train_unet(pipe.unet, pipe.text_encoder, pipe.tokenizer, latents, captions, args.unet_steps, args.batch,
               args.seed)
    save(args.out, pipe.unet, pipe.vae, pipe.text_encoder)
    print(f"saved to {args.out} after {time.time() - started:.0f}s in all", flush=True)


if __name__ == "__main__":
    main()
