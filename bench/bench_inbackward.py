"""Peak memory of one training step of the full-size SD 1.5 UNet: normal path vs optimizer in backward.

    python bench/bench_inbackward.py                    # 32x32 latents (256 px), 2 steps, CPU or GPU
    python bench/bench_inbackward.py --latent 64        # 512 px (a GPU; ~4x the CPU time)

Each mode runs in a fresh process (so neither inherits the other's allocator high-water
mark): the SD 1.5 UNet architecture with seeded random weights (dbnb's shipped config, no
download), fp32 weights and AdamW (fp32 states), batch 1, gradient checkpointing on (the
default; --no-checkpointing turns it off), random latents / timesteps / text states, MSE loss.
It prints the resident set (CPU) or torch's allocated peak (CUDA) before the steps and the peak
of each step. On a CPU this is a rough proxy for VRAM: RSS also counts the Python heap and
libraries, the CPU AdamW runs tensor by tensor (no foreach temporaries), and CPU kernels'
scratch memory differs from cuDNN's; the difference between the two modes is the figure to read.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS


def child(mode: str, latent: int, steps: int, checkpointing: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from dbnb.family.sd1.skeleton import skeleton_config
    from dbnb.train.inbackward import OptimizerInBackward

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    started = time.time()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in skeleton_config("unet").items() if not k.startswith("_")})
    unet.to(device).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    built = time.time() - started
    params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": 1e-6}]
    kwargs = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    optimizer = (OptimizerInBackward(groups, torch.optim.AdamW, **kwargs) if mode == "inbackward"
                 else torch.optim.AdamW(groups, **kwargs))
    g = torch.Generator().manual_seed(0)
    gc.collect()

    def now() -> float:  # GiB
        return torch.cuda.memory_allocated() / 2**30 if cuda else rss_kib("VmRSS") / 2**20

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else rss_kib("VmHWM") / 2**20

    def reset() -> None:
        torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()

    out = {"mode": mode, "device": device, "latent": latent, "checkpointing": checkpointing,
           "params": sum(p.numel() for p in params), "build_s": round(built, 1),
           "before_gib": round(now(), 2), "step_peak_gib": [], "step_s": []}
    for _ in range(steps):
        latents = torch.randn(1, 4, latent, latent, generator=g).to(device)
        noise = torch.randn(1, 4, latent, latent, generator=g).to(device)
        timesteps = torch.randint(0, 1000, (1,), generator=g).to(device)
        hidden = torch.randn(1, 77, 768, generator=g).to(device)
        reset()
        t = time.time()
        loss = F.mse_loss(unet(latents + noise, timesteps, hidden).sample.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        out["step_s"].append(round(time.time() - t, 1))
        out["step_peak_gib"].append(round(peak(), 2))
        del loss
    out["after_gib"] = round(now(), 2)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent size (pixels / 8); 32 = 256 px")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--child", choices=("normal", "inbackward"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.latent, args.steps, not args.no_checkpointing)), flush=True)
        return
    rows = []
    for mode in ("normal", "inbackward"):
        cmd = [sys.executable, __file__, "--child", mode, "--latent", str(args.latent), "--steps", str(args.steps)]
        cmd += ["--no-checkpointing"] if args.no_checkpointing else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    grads = rows[0]["params"] * 4 / 2**30
    print(f"SD 1.5 UNet ({rows[0]['params'] / 1e6:.0f} M parameters, fp32 gradients {grads:.2f} GiB), "
          f"{args.latent}x{args.latent} latents ({args.latent * 8} px), batch 1, AdamW fp32, "
          f"gradient checkpointing {'off' if args.no_checkpointing else 'on'}, device {rows[0]['device']}")
    unit = "allocated" if rows[0]["device"] == "cuda" else "RSS"
    for r in rows:
        print(f"  {r['mode']:10}  {unit} before {r['before_gib']:6.2f} GiB   peak per step "
              + "  ".join(f"{x:6.2f}" for x in r["step_peak_gib"]) + " GiB   step "
              + "  ".join(f"{x:.1f}" for x in r["step_s"]) + " s")
    saved = max(rows[0]["step_peak_gib"]) - max(rows[1]["step_peak_gib"])
    print(f"  peak saved by optimizer in backward: {saved:.2f} GiB")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
