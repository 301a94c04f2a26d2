"""System RAM of a full-size SDXL through dbnb's load, train set-up, checkpoint save, LoRA export and export,
and the SDXL LoRA step's FLOPs at 1024 px.

Free Colab has a 16 GB T4 and about 12.7 GB of system RAM: the crash at the first load or save
is the top complaint about other SDXL notebooks. This builds a full-size SDXL with random
weights from the shipped config (dbnb/assets/sdxl; no download), saves it as a diffusers folder
in fp16 (about 7 GB), then runs each phase in a fresh process and prints its peak RSS (VmHWM:
the phase's own peak is read after resetting the high-water mark through /proc/self/clear_refs).

    python bench/bench_sdxl_ram.py [--dir /tmp/dbnb-sdxl] [--keep]

Measured on a 2-core CPU box (24 GiB RAM, torch 2.13.0+cpu, no GPU), peak RSS with every weight read:
open fp16 7.41 GiB, LoRA train set-up 6.93 GiB, checkpoint save (LoRA) 5.89 GiB, LoRA export (kohya
file read back onto the fp16 base) 7.49 GiB, one-file export with read-back 7.71 GiB; 17.7 TFLOP.

The FLOPs are counted by torch.utils.flop_counter on fake tensors (no memory, no weights): one
forward and backward of the UNet with LoRA adapters, gradient checkpointing on (its recomputed
forward counted), batch 1, the text embeddings and latents cached as the T4 tier runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIMIT_GIB = 12.0  # Colab's 12.7 GB of system RAM, less what the notebook kernel around it holds

# Run in a fresh process: the phase's figures as one JSON line. `peak()` is the process's VmHWM in
# GiB; `reset()` restarts it so the next phase's peak is its own (with what is held before it).
PRELUDE = """
import json, sys, time
import torch
def peak():
    return round(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20, 2)
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def touch(models):
    # Weights read from a safetensors file may stay lazily mapped; reading each one (as .to("cuda")
    # does) makes it resident: the figure that matters on a 12.7 GB Colab.
    for part in (models.denoiser, models.encoder, models.autoencoder):
        for p in part.parameters():
            p.detach().double().sum()
    return peak()
folder = sys.argv[1]
figures = {}
"""
OPEN = PRELUDE + """
from dbnb.family.sdxl.family import SDXL
t = time.time()
models = SDXL.open(folder, dtype=torch.float16)
figures["open fp16 (previews, export)"] = {"peak_rss_gib": peak(), "seconds": round(time.time() - t, 1)}
figures["open fp16, every weight read"] = {"peak_rss_gib": touch(models), "seconds": round(time.time() - t, 1)}
print(json.dumps(figures))
"""
TRAIN = PRELUDE + """
from dbnb.core.config import Config
from dbnb.family.sdxl.family import SDXL
from dbnb.run.checkpoints import save_checkpoint
from dbnb.run.folder import RunFolder
config = Config(pretrained_model_name_or_path=folder, use_lora=True, mixed_precision="fp16", resolution=1024,
                gradient_checkpointing=True, use_8bit_adam=False, output_dir=sys.argv[2], run_name="bench")
t = time.time()
models = SDXL.load(config, torch.device("cpu"), torch.float16)
figures["train set-up (load + LoRA, fp16)"] = {"peak_rss_gib": peak(), "seconds": round(time.time() - t, 1)}
figures["train set-up, every weight read"] = {"peak_rss_gib": touch(models), "seconds": round(time.time() - t, 1)}
trained = [p for m in (models.denoiser, models.encoder) for p in m.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trained, lr=1e-4)
for p in trained:  # the optimizer's state exists from the first step: a checkpoint saves it
    p.grad = torch.zeros_like(p)
optimizer.step()
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
run = RunFolder(sys.argv[2] + "/bench")
run.create()
run.write_config(config)  # the LoRA export below reads the run as `dbnb export` does
run.record_base(config, models.base, SDXL.name)
reset()
t = time.time()
save_checkpoint(run, 1, 1, models.denoiser, models.encoder, optimizer, scheduler, None, config, SDXL)
figures["checkpoint save (LoRA)"] = {"peak_rss_gib": peak(), "seconds": round(time.time() - t, 1)}
print(json.dumps(figures))
"""
EXPORT = PRELUDE + """
from dbnb.ship.export import export
t = time.time()
export(folder, to=sys.argv[2], precision="fp16")
figures["export (single file, fp16)"] = {"peak_rss_gib": peak(), "seconds": round(time.time() - t, 1)}
print(json.dumps(figures))
"""
LORA_EXPORT = PRELUDE + """
from dbnb.ship.export import export
t = time.time()  # the LoRA checkpoint the train phase saved, as kohya's file, read back onto the base
export(sys.argv[2] + "/bench", to=sys.argv[2])
figures["LoRA export (kohya file, read back)"] = {"peak_rss_gib": peak(), "seconds": round(time.time() - t, 1)}
print(json.dumps(figures))
"""


def build(folder: Path) -> None:
    """A full-size SDXL with random fp16 weights, from the shipped configs, as a diffusers folder.
    Each part is built on the meta device and its tensors drawn one at a time."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dbnb.family.sdxl.memory import SKELETON, component_config

    shutil.copytree(SKELETON, folder, dirs_exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    builders = {"unet": (lambda c: UNet2DConditionModel.from_config(c), "diffusion_pytorch_model.safetensors"),
                "vae": (lambda c: AutoencoderKL.from_config(c), "diffusion_pytorch_model.safetensors"),
                "text_encoder": (lambda c: CLIPTextModel(CLIPTextConfig(**c)), "model.safetensors"),
                "text_encoder_2": (lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)), "model.safetensors")}
    for component, (make, file) in builders.items():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in make(component_config("", component)).state_dict().items()}
        state = {k: (torch.randn(shape, generator=generator) * 0.02).half() for k, shape in shapes.items()}
        save_file(state, str(folder / component / file), metadata={"format": "pt"})
        del state


def lora_step_flops(resolution: int = 1024) -> int:
    """FLOPs of one SDXL LoRA training step's UNet forward and backward at `resolution`, batch 1."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from dbnb.core.config import Config
    from dbnb.family.sdxl.family import SDXL
    from dbnb.family.sdxl.memory import SKELETON, empty_parts

    config = Config(pretrained_model_name_or_path=str(SKELETON), use_lora=True, mixed_precision="fp16",
                    gradient_checkpointing=True, resolution=resolution)
    parts = empty_parts(config, torch.float16)
    side = resolution // parts.latent_factor
    with FakeTensorMode(allow_non_fake_inputs=True):
        parts.denoiser.to_empty(device="cpu")
        parts.denoiser.train()
        conditioning = {"hidden_states": torch.randn(1, 77, 2048, dtype=torch.float16),
                        "text_embeds": torch.randn(1, 1280, dtype=torch.float16)}
        latents = torch.randn(1, parts.latent_channels, side, side)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast("cpu", dtype=torch.float16):
                pred = SDXL.predict(parts.denoiser, latents, torch.zeros(1, dtype=torch.long), conditioning)
            torch.nn.functional.mse_loss(pred.float(), latents).backward()
    return counter.get_total_flops()


def run_phase(script: str, folder: Path, scratch: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(scratch)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to write the model (about 7 GB) and a checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the model folder for the next run")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="dbnb-sdxl-"))
    folder, scratch = work / "sdxl-random", work / "scratch"
    import torch

    print(f"machine: {os.cpu_count()} CPU cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} "
          f"GiB RAM, torch {torch.__version__}, no GPU needed")
    flops = lora_step_flops()
    print(f"SDXL LoRA step at 1024 px, batch 1 (UNet forward + checkpointed backward): {flops / 1e12:.1f} TFLOP")
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        started = time.time()
        # In a child process, so no phase below counts the build's memory.
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        f"from bench.bench_sdxl_ram import build; from pathlib import Path; build(Path({str(folder)!r}))"],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"built a full-size random SDXL (fp16) in {folder} in {time.time() - started:.0f} s")
    figures = {}
    try:
        for script in (OPEN, TRAIN, LORA_EXPORT, EXPORT):
            if script is not LORA_EXPORT:  # that one exports the run TRAIN left in scratch
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir(parents=True)
            found = run_phase(script, folder, scratch)
            figures.update(found)
            for phase, figure in found.items():
                if "peak_rss_gib" in figure:
                    over = "  ← over the limit" if figure["peak_rss_gib"] > LIMIT_GIB else ""
                    print(f"{phase}: peak RSS {figure['peak_rss_gib']:.2f} GiB in {figure['seconds']} s{over}", flush=True)
                else:
                    print(f"{phase}: {figure}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"flops_lora_step_1024": flops, "phases": figures}))


if __name__ == "__main__":
    main()
