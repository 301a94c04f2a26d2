"""Every memory profile's VRAM and speed on a full-size SD 1.5 (and SDXL), in one run, and docs/performance.md from it.

    python bench/gpu_suite.py                    # a CUDA GPU: all profiles and extras (about 6-8 minutes)
    python bench/gpu_suite.py --dry-run          # the tiny model on the CPU in seconds: the same code paths
    python bench/gpu_suite.py --only 1,3,export  # some profiles / extras
    python bench/gpu_suite.py --hf-script train_dreambooth.py   # + diffusers' script, profile 1's settings
    python bench/gpu_suite.py --write-doc        # docs/performance.md again from docs/gpu-results/*.json

The model is SD 1.5's architecture with random weights from dbnb's shipped config (no download;
built once into --cache), trained on 5 instance pictures and 10 class images at 512 px; profiles
10-11 train a full-size random SDXL (dbnb/assets/sdxl's configs, bench/bench_sdxl_ram.py's build:
about 7 GB in --cache) at 1024 px as users run it on a T4 (LoRA) and on a 40 GB card (full). Each
profile runs `dbnb.train.loop.train` in a process of its own (so no allocator cache or CUDA context
carries over), reports steps/s after the warm-up steps, torch's peak VRAM allocated and
reserved, whether every logged loss was finite, and whether peak reserved + CUDA context fits a
T4 / a 12 GB card. The extras time class-image generation, a preview rendered during training,
an fp16 export and loading the exported single file, and profile 1 run twice with
deterministic=true, its weights compared bitwise and its speed against profile 1's. A GPU run writes
docs/gpu-results/<gpu>-<date>.json and rebuilds docs/performance.md from every such file (a second
GPU adds its table); a dry run writes both under --out (default: in --cache), never into docs/.

Needs, checked in its first second (pip names): torch, diffusers, transformers, accelerate,
safetensors, huggingface_hub, Pillow, numpy, tqdm, PyYAML and dbnb itself (this checkout), plus
bitsandbytes on a GPU (profiles 1-6 and 9 use 8-bit AdamW). Optional: xformers (profile 8).
On a GPU box without them, carry diffusers / bitsandbytes / xformers as wheels (docs/performance.md
says how). `--hf-script`: diffusers' examples/dreambooth/train_dreambooth.py from the release tag
of the installed diffusers (the one on main asks for a dev version).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's dbnb, also in the child processes
    sys.path.insert(0, str(ROOT))
NEEDED = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "accelerate": "accelerate",
          "safetensors": "safetensors", "huggingface_hub": "huggingface_hub", "PIL": "Pillow", "numpy": "numpy",
          "tqdm": "tqdm", "yaml": "PyYAML"}
NEEDED_ON_GPU = {"bitsandbytes": "bitsandbytes"}
# What torch reports as these cards' total VRAM (mem_get_info), in GiB.
CARDS = {"T4 15 GB": 14.74, "12 GB card": 11.76}
INSTANCE_PROMPT, CLASS_PROMPT = "hnzk girl", "girl"
# Settings that dbnb would otherwise replace with a warning: a figure taken after one of these
# warnings is not the profile's figure.
FALLBACKS = ("using torch.optim.AdamW", "using PyTorch SDPA")


def missing_packages(gpu: bool) -> list[str]:
    names = {**NEEDED, **(NEEDED_ON_GPU if gpu else {})}
    missing = [pip for module, pip in names.items() if importlib.util.find_spec(module) is None]
    if importlib.util.find_spec("dbnb") is None:
        missing.append(f"dbnb (run from its checkout, {ROOT})")
    return missing


@dataclass(frozen=True)
class Profile:
    number: int
    name: str
    settings: dict = field(default_factory=dict)  # on top of profile 1's
    needs: str = ""  # "bf16", "xformers" or "40 GB": skipped where the machine lacks it
    model: str = "sd15"  # or "sdxl": the base the profile trains (Plan.inputs)


# Profile 1 is what a Colab T4 user runs; the others change one thing each.
T4_SETTINGS = dict(mixed_precision="fp16", use_8bit_adam=True, gradient_checkpointing=True, attention="sdpa",
                   cache_latents=True, train_batch_size=1)
PROFILES = (
    Profile(1, "T4 profile: fp16, 8-bit AdamW, gradient checkpointing, SDPA, cached latents, batch 1"),
    Profile(2, "1 without gradient checkpointing", {"gradient_checkpointing": False}),
    Profile(3, "1 without 8-bit Adam", {"use_8bit_adam": False}),
    Profile(4, "1 in bf16", {"mixed_precision": "bf16"}, needs="bf16"),
    Profile(5, "1 + train_text_encoder", {"train_text_encoder": True}),
    Profile(6, "1 + prior preservation (batch doubles)",
            {"with_prior_preservation": True, "num_class_images": 10, "class_prompt": CLASS_PROMPT}),
    # The extension's LoRA default rank with LoCon on the convs; its run is what --bake merges.
    Profile(7, "LoRA rank 32 (+ conv rank 16)",
            {"use_lora": True, "lora_rank": 32, "lora_conv_rank": 16, "lora_learning_rate": 1e-4}),
    Profile(8, "1 with xformers instead of SDPA", {"attention": "xformers"}, needs="xformers"),
    # Compared with profile 1. It cannot use fp16 (no GradScaler in backward): bf16 where the GPU has it.
    Profile(9, "1 with optimizer_in_backward (bf16, no clipping)",
            {"optimizer_in_backward": True, "max_grad_norm": 0.0, "mixed_precision": "bf16"}),
    # SDXL as memory_profile=auto tiers it (dbnb.family.sdxl.memory): LoRA on a T4, the UNet whole on 40 GB+.
    Profile(10, "SDXL T4 profile: LoRA rank 32, 1024 px, fp16, 8-bit AdamW, gradient checkpointing, cached latents",
            {"use_lora": True, "lora_rank": 32, "lora_learning_rate": 1e-4}, model="sdxl"),
    Profile(11, "SDXL full fine-tune (UNet), 1024 px, bf16, 8-bit AdamW, gradient checkpointing, cached latents",
            {"train_text_encoder": False, "mixed_precision": "bf16"}, needs="40 GB", model="sdxl"),
)
SDXL_MIN_GIB = 39.0  # a 40 GB card as torch reports it: dbnb refuses a full SDXL fine-tune below (FULL_FINE_TUNE_MIN_GIB)
# What the CPU children would each import again (diffusers imports most lazily).
PRELOAD = ["dbnb.train.loop", "dbnb.prep.classimages", "dbnb.ship.export", "dbnb.family.sd1.load", "dbnb.evaluate.sample", "accelerate",
           "diffusers.training_utils", "diffusers.optimization", "diffusers.pipelines.stable_diffusion",
           "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
           "transformers.models.clip.modeling_clip", "transformers.models.clip.tokenization_clip", "tqdm.auto"]
EXTRAS = ("classimages", "preview", "export", "bake", "load", "hf", "deterministic")


@dataclass
class Plan:
    """What this run does and where: decided once in the parent, handed to every child."""
    dry_run: bool
    cache: Path
    model: Path
    instance_dir: Path
    class_dir: Path
    resolution: int
    steps: int
    warmup: int
    class_steps: int
    hf_script: str = ""
    sdxl_resolution: int = 1024
    sdxl: bool = False  # an SDXL profile is selected: build_inputs makes the SDXL and its pictures

    def inputs(self, model: str) -> tuple[Path, Path, Path, int]:
        """(model folder, instance pictures, class pictures, resolution) a profile of `model` trains on."""
        if model == "sdxl":
            data = self.cache / "data-sdxl"
            return self.cache / f"model-sdxl-{'tiny' if self.dry_run else 'full'}", data / "instance", \
                data / "class", self.sdxl_resolution
        return self.model, self.instance_dir, self.class_dir, self.resolution

    def train_settings(self, profile: Profile, machine: dict, run_name: str) -> dict:
        settings = {**T4_SETTINGS, **profile.settings}
        if settings["mixed_precision"] == "bf16" and machine["cuda"] and not machine["bf16"]:
            settings["mixed_precision"] = "no"  # only profile 9 gets here: 4 is skipped without bf16
        if not machine["cuda"]:  # the CPU stand-ins: same code paths, no fp16 / bitsandbytes there
            settings["mixed_precision"] = "no" if settings["mixed_precision"] == "fp16" else settings["mixed_precision"]
            settings["use_8bit_adam"] = False
        model, instance_dir, class_dir, resolution = self.inputs(profile.model)
        return dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(instance_dir),
                    class_data_dir=str(class_dir), instance_prompt=INSTANCE_PROMPT, resolution=resolution,
                    max_train_steps=self.steps, save_every_steps=0, sample_every_steps=0, lr_warmup_steps=0,
                    output_dir=str(self.cache / "runs"), run_name=run_name, **settings)


# --- what runs in each child process ----------------------------------------------------------------

def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    except OSError:
        pass  # not Linux, or a sandbox without it: the peak then includes what came before


def memory_figures() -> dict:
    import torch

    rss = next((int(line.split()[1]) / 2**20 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")), None) if Path("/proc/self/status").exists() else None
    out = {"peak_rss_gib": rss}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        out.update(vram_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   vram_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   context_gib=max(0.0, (total - free - torch.cuda.memory_reserved()) / 2**30))
    return out


def start_measuring() -> None:
    import torch

    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def train_profile(plan: Plan, task: dict) -> dict:
    import warnings

    from bench_train import steps_per_second

    from dbnb.core.config import Config
    from dbnb.train.loop import train

    config = Config(**task["settings"])
    predicted = predicted_figures(config)  # before measuring: the planner's fake tensors cost host RAM only
    start_measuring()
    stamps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config, progress=False, on_step=lambda record: stamps.append(time.perf_counter()))
    records = [json.loads(line) for line in (result.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    notes = sorted({str(w.message) for w in caught if any(f in str(w.message) for f in FALLBACKS)})
    return {"steps_per_s": steps_per_second([r["time"] for r in records], plan.warmup), "steps": len(records),
            "loss_finite": all(math.isfinite(x) for x in losses), "loss_last": losses[-1],
            "run_dir": str(result.run_dir), "fell_back": notes, "stamps": stamps, **predicted, **memory_figures()}


def predicted_figures(config) -> dict:
    """The planner's prediction for this profile, recorded beside what the GPU measures: the first GPU
    run calibrates dbnb.train.planner (its CUDA context and allocator slack are stated, not measured)."""
    from dbnb.train.planner import GIB, plan

    try:
        predicted = plan(config)
    except Exception as e:  # a figure missing from the table, never a profile lost
        return {"predicted_error": f"{type(e).__name__}: {e}"}
    return {"predicted_allocated_gib": predicted.allocated / GIB, "predicted_vram_gib": predicted.vram_gib,
            "predicted_phase": predicted.peak_phase}


def preview(plan: Plan, task: dict) -> dict:
    """Three steps with a preview after the second, the VAE moved off the GPU by the latent cache."""
    out = train_profile(plan, {**task, "settings": {**task["settings"], "max_train_steps": 3,
                                                    "sample_every_steps": 2, "num_samples": 1}})
    t = [out["stamps"][0]] + out.pop("stamps")  # step 2 = a step + the preview; step 3 = a step
    out["preview_s"] = (t[2] - t[1]) - (t[3] - t[2])
    grids = list((Path(out["run_dir"]) / "samples").rglob("*.png"))
    if not grids:
        raise RuntimeError("the preview step wrote no image")
    return out


def class_images(plan: Plan, task: dict) -> dict:
    import torch

    from dbnb.core.config import Config
    from dbnb.prep import classimages as ci

    config = Config(pretrained_model_name_or_path=str(plan.model), class_prompt="1girl", resolution=plan.resolution,
                    class_data_dir=str(plan.cache / "class-warmup"), num_class_images=1,
                    class_infer_steps=plan.class_steps, class_batch_size=0,
                    mixed_precision="fp16" if torch.cuda.is_available() else "no")
    for sub in ("class-warmup", "class-timed"):
        shutil.rmtree(plan.cache / sub, ignore_errors=True)
    models = ci.open_base(config)
    ci.load_generation_pipeline(config, models)  # on the device, in the dtype, before the free VRAM is read
    device, dtype = ci.generation_device_dtype(config)
    batch = ci.pick_batch_size(config, device, dtype)
    ci.generate_class_images(config.replace(num_class_images=batch), progress=False, models=models)  # warm-up
    count = batch if plan.dry_run else 2 * batch
    config = config.replace(class_data_dir=str(plan.cache / "class-timed"), num_class_images=count)
    start_measuring()
    t = time.perf_counter()
    written = ci.generate_class_images(config, progress=False, models=models)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {"images_per_s": len(written) / seconds, "batch": batch, "images": len(written),
            "steps": plan.class_steps, **memory_figures()}


def export_fp16(plan: Plan, task: dict) -> dict:
    from dbnb.ship.export import export

    start_measuring()
    t = time.perf_counter()
    result = export(task["run_dir"], precision="fp16", overwrite=True)
    return {"seconds": time.perf_counter() - t, "path": str(result.path), "size_gib": result.size / 2**30,
            **memory_figures()}


def bake_lora(plan: Plan, task: dict) -> dict:
    """`dbnb export RUN --bake`: profile 7's LoRA merged into the base model, one verified fp16 file."""
    from dbnb.ship.export import export

    start_measuring()
    t = time.perf_counter()
    result = export(task["run_dir"], precision="fp16", overwrite=True, bake=True)
    return {"seconds": time.perf_counter() - t, "path": str(result.path), "size_gib": result.size / 2**30,
            **memory_figures()}


def load_single_file(plan: Plan, task: dict) -> dict:
    from dbnb.family.sd1.load import load_pipeline

    start_measuring()
    t = time.perf_counter()
    pipe = load_pipeline(task["path"])
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "params_m": sum(p.numel() for p in pipe.unet.parameters()) / 1e6, **memory_figures()}


def compare_runs(plan: Plan, task: dict) -> dict:
    """The fp32 master UNet weights two runs end with (what a resume reads): bitwise equal or not."""
    import torch

    from dbnb.run.checkpoints import master_state
    from dbnb.run.folder import RunFolder

    first, second = (master_state(RunFolder(d).checkpoints()[-1], "unet") for d in task["run_dirs"])
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    worst = max(((first[k].double() - second[k].double()).abs().max().item() for k in differing), default=0.0)
    return {"tensors": len(first), "differing": len(differing), "max_abs_diff": worst}


def hf_script(plan: Plan, task: dict) -> dict:
    """diffusers' train_dreambooth.py in this process, its step times read off its progress bar."""
    import runpy

    import tqdm.auto

    stamps, update = [], tqdm.auto.tqdm.update

    def timed_update(bar, n=1):
        if bar.desc == "Steps":
            stamps.append(time.perf_counter())
        return update(bar, n)

    tqdm.auto.tqdm.update = timed_update
    s = task["settings"]
    argv = [plan.hf_script, "--pretrained_model_name_or_path", str(plan.model), "--instance_data_dir",
            str(plan.instance_dir), "--instance_prompt", INSTANCE_PROMPT, "--resolution", str(plan.resolution),
            "--train_batch_size", "1", "--learning_rate", "1e-6", "--lr_scheduler", "constant", "--lr_warmup_steps",
            "0", "--max_train_steps", str(plan.steps), "--checkpointing_steps", str(10 * plan.steps),
            "--output_dir", str(plan.cache / "hf-run"), "--mixed_precision", s["mixed_precision"]]
    argv += ["--gradient_checkpointing"] * s["gradient_checkpointing"] + ["--use_8bit_adam"] * s["use_8bit_adam"]
    sys.argv = argv
    start_measuring()
    runpy.run_path(plan.hf_script, run_name="__main__")
    timed = stamps[plan.warmup:]
    rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    return {"steps_per_s": rate, "steps": len(stamps), **memory_figures()}


def build_inputs(plan: Plan, task: dict) -> dict:
    from bench_train import model_folder

    from dbnb.prep.classimages import write_blank_images
    from dbnb.world.demo import write_dataset

    t = time.perf_counter()
    model_folder("tiny" if plan.dry_run else "sd15", plan.cache)
    _, klass = write_dataset(plan.instance_dir.parent, n_instance=5, size=plan.resolution)
    write_blank_images(klass, 5 * 2, plan.resolution, progress=False)  # transparent: a quick stand-in
    if plan.sdxl:
        model, instance, _, resolution = plan.inputs("sdxl")
        if not (model / "model_index.json").exists():
            build_sdxl(model, plan.dry_run)
        write_dataset(instance.parent, n_instance=5, size=resolution)
    return {"seconds": time.perf_counter() - t}


def build_sdxl(folder: Path, tiny: bool) -> None:
    """The SDXL the profiles train: the tiny one for a dry run, else full size with random fp16 weights."""
    if tiny:
        from dbnb.world.tiny_sdxl import make_tiny_sdxl
        make_tiny_sdxl(folder)
    else:
        from bench_sdxl_ram import build
        build(folder)


def machine_info(plan: Plan, task: dict) -> dict:
    """In a child too: the CUDA checks would otherwise leave a CUDA context in the parent, counted
    in every child's free-VRAM figure."""
    import platform

    import torch

    from dbnb.core.hardware import check_bitsandbytes, check_xformers, cuda_summary

    def version(module: str) -> str:
        try:
            return importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 — absent or broken: the doc says so
            return "-"

    gpu = cuda_summary()
    info = {"date": time.strftime("%Y-%m-%d"), "dry_run": plan.dry_run, "cuda": gpu is not None,
            "gpu": gpu["name"] if gpu else f"CPU ({os.cpu_count()} cores)",
            "vram_gib": gpu["total_vram_gib"] if gpu else None, "bf16": bool(gpu and gpu["bf16"]),
            "python": platform.python_version(), "torch": torch.__version__, "cuda_version": torch.version.cuda or "-",
            **{m: version(m) for m in ("diffusers", "transformers", "accelerate", "bitsandbytes", "xformers")}}
    xformers = check_xformers()
    info.update(xformers_check=xformers.detail, xformers_ok=xformers.ok,
                bitsandbytes_check=check_bitsandbytes().detail)
    return info


TASKS = {"machine": machine_info, "build": build_inputs, "train": train_profile, "preview": preview,
         "classimages": class_images, "export": export_fp16, "bake": bake_lora, "load": load_single_file,
         "hf": hf_script, "compare": compare_runs}


def child(kind: str, plan: Plan, task: dict, out_path: str) -> None:
    import traceback

    sys.path.insert(0, str(Path(__file__).parent))
    if plan.dry_run:  # tiny models gain nothing from threads, and dry-run children may share the cores
        import torch
        torch.set_num_threads(1)
    try:
        result = {"status": "ok", **TASKS[kind](plan, task)}
    except BaseException as e:  # noqa: BLE001 — every failure becomes the row's status and reason
        first = (str(e).strip().splitlines() or [""])[0]
        result = {"status": "failed", "reason": f"{type(e).__name__}: {first}"[:300],
                  "traceback": traceback.format_exc()[-3000:]}
    Path(out_path).write_text(json.dumps(result, default=str))


# --- the parent: one child per profile / extra, then the results file and the doc ------------------

def skip_reason(profile: Profile, machine: dict) -> str:
    if profile.needs == "bf16" and machine["cuda"] and not machine["bf16"]:
        return "needs bf16: this GPU has none"  # (a CPU has bf16 autocast: the dry run runs it)
    if profile.needs == "40 GB" and machine["cuda"] and machine["vram_gib"] < SDXL_MIN_GIB:
        return f"needs a 40 GB card: this GPU has {machine['vram_gib']:.1f} GiB (dbnb refuses it below)"
    if profile.needs == "xformers" and not machine["xformers_ok"]:
        return ("needs CUDA (xformers runs on a GPU only)" if not machine["cuda"]
                else f"xformers unusable here: {machine['xformers_check']}")
    return ""


def run_child(ctx, kind: str, plan: Plan, task: dict, timeout: float) -> dict:
    out_path = plan.cache / f"result-{kind}-{task.get('id', '')}.json"
    out_path.unlink(missing_ok=True)
    started = time.perf_counter()
    process = ctx.Process(target=child, args=(kind, plan, task, str(out_path)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    if not out_path.exists():
        return {"status": "failed", "reason": f"the child process died (exit code {process.exitcode})"}
    result = json.loads(out_path.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def fits(row: dict) -> dict:
    if row.get("vram_reserved_gib") is None:
        return {}
    need = row["vram_reserved_gib"] + row.get("context_gib", 0.0)
    return {"need_gib": need, "fits": {card: need <= total for card, total in CARDS.items()}}


def process_context(dry_run: bool):
    import multiprocessing as mp

    # A GPU child starts from a fresh interpreter; on the CPU the children fork from a server that
    # already imported the libraries (~6 s a process saved on a small box; no CUDA there to share).
    ctx = mp.get_context("forkserver" if dry_run else "spawn")
    if dry_run:
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_suite(ctx, plan: Plan, machine: dict, selected: set[str], timeout: float, jobs: int = 1) -> dict:
    built = run_child(ctx, "build", plan, {}, max(timeout, 600))
    if built["status"] != "ok":
        sys.exit(f"gpu_suite: building the model and pictures failed: {built['reason']}\n{built.get('traceback', '')}")
    print(f"inputs ready in {built['seconds']:.0f} s: {plan.model}", flush=True)

    def profile_row(profile: Profile) -> dict:
        row = {"id": profile.number, "name": profile.name}
        reason = skip_reason(profile, machine)
        if reason:
            return {**row, "status": "skipped", "reason": reason}
        settings = plan.train_settings(profile, machine, f"profile-{profile.number}-{int(time.time())}")
        if profile.number != 1 and settings == plan.train_settings(PROFILES[0], machine, settings["run_name"]):
            return {**row, "status": "skipped", "reason": "needs CUDA: on a CPU it is profile 1"}
        row.update(settings={k: settings[k] for k in (*T4_SETTINGS, *profile.settings)})
        row.update(run_child(ctx, "train", plan, {"id": profile.number, "settings": settings}, timeout))
        row.update(fits(row))
        if row.get("fell_back"):
            row.update(status="fell back", reason="; ".join(row["fell_back"]))
        row.pop("stamps", None)
        if row.get("run_dir") and profile.number not in (1, 7):  # GBs; 1 is exported below, 7 baked
            shutil.rmtree(row["run_dir"], ignore_errors=True)
        print(summary_line(row), flush=True)
        return row

    # One GPU: one child at a time, or the memory figures mix. A dry run runs a few at once; an extra
    # that needs another's output waits for it (submitted after it, so it never waits on a queued one).
    futures = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for profile in PROFILES:
            if str(profile.number) in selected:
                futures[profile.number] = pool.submit(profile_row, profile)
        for name in EXTRAS:
            if name in selected:
                futures[name] = pool.submit(run_extra, ctx, name, plan, machine, futures, timeout)
    rows = [futures[p.number].result() for p in PROFILES if p.number in futures]
    extras = {name: futures[name].result() for name in EXTRAS if name in futures}
    by_id = {r["id"]: r for r in rows}
    for kept in (1, 7):
        if by_id.get(kept, {}).get("run_dir"):
            shutil.rmtree(by_id[kept]["run_dir"], ignore_errors=True)
    if 9 in by_id and 1 in by_id:
        by_id[9]["compared_to"] = 1
    model = "tiny (CPU stand-in)" if plan.dry_run else "SD 1.5 architecture, random weights"
    if plan.sdxl:
        model += f"; profiles 10-11: {'the tiny SDXL' if plan.dry_run else 'SDXL 1.0 architecture, random weights'}, " \
                 f"{plan.sdxl_resolution} px"
    return {"machine": machine, "profiles": rows, "extras": extras,
            "plan": {"model": model, "resolution": plan.resolution, "steps": plan.steps, "warmup": plan.warmup,
                     "class_steps": plan.class_steps, "cards": CARDS}}


def run_extra(ctx, name: str, plan: Plan, machine: dict, futures: dict, timeout: float) -> dict:
    def done(key) -> dict:
        return futures[key].result() if key in futures else {}

    profile_1 = plan.train_settings(PROFILES[0], machine, f"{name}-{int(time.time())}")
    task = {"id": name, "settings": profile_1}
    if name == "deterministic":
        return deterministic_runs(ctx, plan, profile_1, timeout)
    if name == "hf" and not plan.hf_script:
        result = {"status": "skipped", "reason": "no --hf-script given"}
    elif name == "export" and done(1).get("status") != "ok":
        result = {"status": "skipped", "reason": "needs profile 1's run (run it too: --only 1,export)"}
    elif name == "bake" and done(7).get("status") != "ok":
        result = {"status": "skipped", "reason": "needs profile 7's LoRA run (run it too: --only 7,bake)"}
    elif name == "load" and done("export").get("status") != "ok":
        result = {"status": "skipped", "reason": "needs the export (run it too: --only 1,export,load)"}
    else:
        task.update(run_dir={"export": done(1), "bake": done(7)}.get(name, {}).get("run_dir"),
                    path=done("export").get("path") if name == "load" else None)
        result = run_child(ctx, name, plan, task, timeout)
    if name == "preview" and result.get("run_dir"):
        shutil.rmtree(result["run_dir"], ignore_errors=True)
    if name == "hf":
        shutil.rmtree(plan.cache / "hf-run", ignore_errors=True)  # its saved pipeline: GBs
    print(f"{name}: {result['status']} {result.get('reason', '')}", flush=True)
    return result


def deterministic_runs(ctx, plan: Plan, settings: dict, timeout: float) -> dict:
    """`deterministic=true` (issue 36): profile 1 twice, each in a fresh process, weights compared
    bitwise; its steps/s against profile 1's (deterministic off) in the report."""
    runs = [run_child(ctx, "train", plan, {"id": f"deterministic-{n}",
                                           "settings": {**settings, "deterministic": True,
                                                        "run_name": f"{settings['run_name']}-{n}"}}, timeout)
            for n in (1, 2)]
    failed = next((r for r in runs if r["status"] != "ok"), None)
    if failed:
        result = {k: failed[k] for k in ("status", "reason", "traceback") if k in failed}
    else:
        result = run_child(ctx, "compare", plan, {"id": "deterministic", "run_dirs": [r["run_dir"] for r in runs]},
                           timeout)
        result.update(steps_per_s=sum(r["steps_per_s"] for r in runs) / 2,
                      vram_allocated_gib=max(r.get("vram_allocated_gib") or 0 for r in runs) or None,
                      peak_rss_gib=max(r.get("peak_rss_gib") or 0 for r in runs))
    for r in runs:
        if r.get("run_dir"):
            shutil.rmtree(r["run_dir"], ignore_errors=True)
    print(f"deterministic: {result['status']} {result.get('reason', '')}", flush=True)
    return result


def summary_line(row: dict) -> str:
    text = f"profile {row['id']}: {row['status']}"
    if row.get("reason"):
        text += f" ({row['reason']})"
    if row.get("steps_per_s") is not None:
        text += f", {row['steps_per_s']:.2f} steps/s"
    if row.get("vram_reserved_gib") is not None:
        text += f", VRAM {row['vram_allocated_gib']:.2f} / {row['vram_reserved_gib']:.2f} GiB allocated / reserved"
    return text


def merge(old: dict, new: dict) -> dict:
    """`new`'s rows and extras over `old`'s, in profile / extra order."""
    rows = {r["id"]: r for r in old["profiles"]} | {r["id"]: r for r in new["profiles"]}
    extras = old["extras"] | new["extras"]
    return {**new, "profiles": [rows[k] for k in sorted(rows)],
            "extras": {k: extras[k] for k in EXTRAS if k in extras},
            "seconds": old.get("seconds", 0) + new.get("seconds", 0)}


def slug(machine: dict) -> str:
    if machine["dry_run"]:
        return "dry-run-cpu"
    name = "".join(c if c.isalnum() else "-" for c in machine["gpu"].lower()).strip("-")
    return f"{name}-{machine['date']}"


def parse_only(text: str) -> set[str]:
    known = {str(p.number) for p in PROFILES} | set(EXTRAS)
    wanted = {part.strip() for part in text.split(",") if part.strip()} if text else known
    unknown = wanted - known
    if unknown:
        sys.exit(f"gpu_suite: --only {text}: unknown {', '.join(sorted(unknown))}; choose from profiles 1-{len(PROFILES)} and "
                 f"{', '.join(EXTRAS)}.")
    return wanted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU: code paths, in seconds")
    parser.add_argument("--only", default="", help="comma-separated profiles (1-11) and extras: " + ", ".join(EXTRAS))
    parser.add_argument("--hf-script", default="", help="diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--write-doc", action="store_true", help="only rebuild performance.md from the results")
    parser.add_argument("--out", default="", help="folder of gpu-results/ and performance.md "
                                                  "(default: docs/ on a GPU, inside --cache for a dry run)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dbnb-gpu-suite"))
    parser.add_argument("--steps", type=int, default=None, help="steps per profile (default 30; dry run 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 10; dry run 1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per profile / extra")
    parser.add_argument("--jobs", type=int, default=None, help="profiles at once: dry run only (default 2)")
    args = parser.parse_args(argv)
    selected = parse_only(args.only)
    missing = [] if args.write_doc else missing_packages(gpu=not args.dry_run)
    if missing:
        sys.exit("gpu_suite: missing packages: " + ", ".join(missing) + ". Install them (on a GPU box without a "
                 "network: carry them as wheels, see docs/performance.md), or use --dry-run on a CPU.")
    if args.hf_script and not Path(args.hf_script).is_file():
        sys.exit(f"gpu_suite: --hf-script {args.hf_script}: no such file.")
    from gpu_report import profile_table, write_doc

    cache = Path(args.cache) / ("dry" if args.dry_run else "gpu")
    out = Path(args.out) if args.out else (cache / "docs" if args.dry_run else ROOT / "docs")
    if args.write_doc:
        print(f"wrote {write_doc(out)}")
        return 0
    if args.jobs and args.jobs > 1 and not args.dry_run:
        sys.exit("gpu_suite: --jobs is for --dry-run: on a GPU two profiles at once would mix their memory figures.")
    cache.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    steps = args.steps or (3 if dry else 30)
    plan = Plan(dry_run=dry, cache=cache, model=cache / f"model-{'tiny' if dry else 'sd15'}",
                instance_dir=cache / "data" / "instance", class_dir=cache / "data" / "class",
                resolution=64 if dry else 512, steps=steps, warmup=args.warmup if args.warmup is not None else
                (1 if dry else 10), class_steps=4 if dry else 28,
                hf_script=str(Path(args.hf_script).resolve()) if args.hf_script else "",
                sdxl_resolution=64 if dry else 1024, sdxl=any(p.model == "sdxl" and str(p.number) in selected
                                                              for p in PROFILES))
    if plan.warmup >= plan.steps - 1:
        sys.exit(f"gpu_suite: --warmup {plan.warmup} leaves fewer than 2 timed steps of {plan.steps}.")
    ctx = process_context(dry)
    machine = run_child(ctx, "machine", plan, {}, args.timeout)
    if machine["status"] != "ok":
        sys.exit(f"gpu_suite: reading the machine failed: {machine['reason']}\n{machine.get('traceback', '')}")
    if not dry and not machine["cuda"]:
        sys.exit("gpu_suite: no CUDA GPU here. --dry-run runs the same code paths on the tiny model on the CPU.")
    print(f"{machine['gpu']}, torch {machine['torch']} (CUDA {machine['cuda_version']}), diffusers "
          f"{machine['diffusers']}, bitsandbytes {machine['bitsandbytes']}, xformers {machine['xformers']}", flush=True)
    started = time.perf_counter()
    results = run_suite(ctx, plan, machine, selected, args.timeout, args.jobs or (2 if dry else 1))
    results["seconds"] = time.perf_counter() - started
    folder = out / "gpu-results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug(machine)}.json"
    if path.exists():  # an --only run the same day on the same GPU adds to (or redoes part of) the table
        results = merge(json.loads(path.read_text()), results)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n" + "\n".join(profile_table(results)) + "\n")
    print(f"results: {path}\ndoc: {write_doc(out)} ({results['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
