"""What comes after an SDXL base is chosen (issue 33 item 3): class images rendered by the tiny SDXL
(at the buckets' sizes, at its clip skip, a v-prediction base sampled as v-prediction), `dbnb sample`
test grids and scores of a full and a LoRA run, and the report and model card naming the SDXL base."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from dbnb.core.config import Config
from dbnb.data.buckets import class_image_sizes
from dbnb.evaluate.sample import TestPipeline, sample_run
from dbnb.evaluate.score import score_run
from dbnb.family.base import ClipSkipError
from dbnb.family.render import ZERO_SNR_GUIDANCE_RESCALE, generators, make_scheduler, render
from dbnb.prep import classimages
from dbnb.ship.report import model_card, report_markdown
from dbnb.train.loop import train
from dbnb.world.demo import CLASS_PROMPT, INSTANCE_PROMPT, draw_character

FAST = ["test_seeds=2", "test_infer_steps=2", "test_wide=0",
        "test_flexibility_prompts=['{instance_prompt}, 1girl, swimsuit']"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _pictures(folder: Path) -> Path:
    """The demo character, two square and one tall: with bucketing, class images render in both shapes."""
    folder.mkdir(parents=True)
    for i in range(3):
        picture = draw_character(i, 64)
        (picture if i < 2 else picture.resize((48, 80))).save(folder / f"{i:03d}.png")
    return folder


def _config(source, root: Path, **overrides) -> Config:
    instance = _pictures(root / "instance")
    return Config(**{**dict(pretrained_model_name_or_path=str(source), instance_data_dir=str(instance),
                            instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT, output_dir=str(root / "runs"),
                            run_name="xl", resolution=64, max_train_steps=2, save_every_steps=1, sample_every_steps=0,
                            learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no",
                            use_8bit_adam=False, gradient_checkpointing=False, train_text_encoder=False), **overrides})


def _postprocess(pipe, latents):
    return pipe.image_processor.postprocess(latents, output_type="pil")[0]


@pytest.fixture(scope="module")
def vpred(tiny_sdxl, tmp_path_factory) -> Path:
    """A v-prediction, zero-terminal-SNR copy of the tiny SDXL, as NoobAI-XL v-pred's folder says it,
    where notebook 01 leaves that Hub model (the workspace's Hugging Face cache)."""
    snapshot = "models/hub/models--Laxhar--noobai-XL-Vpred-1.0/snapshots/" + "0" * 40
    folder = shutil.copytree(tiny_sdxl, tmp_path_factory.mktemp("vpred") / snapshot)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction",
                                     "rescale_betas_zero_snr": True}))
    return folder


@pytest.fixture(scope="module")
def runs(vpred, tmp_path_factory):
    """A full UNet run and a LoRA run of the v-prediction tiny SDXL, a checkpoint at each of two steps."""
    root = tmp_path_factory.mktemp("sxeval")
    full = train(_config(vpred, root / "full"), progress=False).run_dir
    lora = train(_config(vpred, root / "lora", use_lora=True, lora_rank=4, lora_text_encoder_rank=2,
                         lora_learning_rate=1e-2), progress=False).run_dir
    return full, lora


# --- class images ----------------------------------------------------------------------------------

def test_sdxl_renders_class_images_at_the_buckets_sizes_and_its_clip_skip(tiny_sdxl, tmp_path):
    config = _config(tiny_sdxl, tmp_path, with_prior_preservation=True, class_data_dir=str(tmp_path / "class"),
                     class_images_mode="generate", num_class_images=3, class_infer_steps=2, bucketing=True)
    status = classimages.make_class_images(config, progress=False)
    assert status.ok and status.have == 3
    sizes = class_image_sizes(config, 3)
    assert len(set(sizes)) == 2  # the square pictures' bucket and the tall one's
    written = classimages.existing_images(Path(config.class_data_dir))
    assert [Image.open(p).size for p in written] == sizes
    assert Image.open(written[0]).info["parameters"].endswith(f"Size: {sizes[0][0]}x{sizes[0][1]}")
    # what diffusers' own SDXL pipeline renders from that prompt, seed and size, on the penultimate layers
    # (its clip_skip=None: SDXL's, which clip_skip 0 means), the tall one (made alone in its batch)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = make_scheduler(config.class_sampler, pipe.scheduler.config)
    (width, height), k = sizes[2], 2
    reference = pipe(config.class_prompt, negative_prompt=config.class_negative_prompt, num_inference_steps=2,
                     guidance_scale=config.class_guidance_scale, width=width, height=height,
                     generator=torch.Generator().manual_seed(config.class_seed + k)).images[0]
    made = np.asarray(Image.open(written[k]), dtype=np.int16)
    assert np.abs(made - np.asarray(reference, dtype=np.int16)).max() <= 1
    with pytest.raises(ClipSkipError, match="clip_skip=1: sdxl models take clip_skip 2"):  # before any image is made
        classimages.make_class_images(config.replace(class_data_dir=str(tmp_path / "refused"), clip_skip=1),
                                      progress=False)
    assert not classimages.existing_images(tmp_path / "refused")


def test_a_v_prediction_sdxl_base_renders_class_and_test_images_as_v_prediction(vpred, tmp_path):
    config = _config(vpred, tmp_path, class_data_dir=str(tmp_path / "class"), class_sampler="euler_a")
    for pipe in (classimages.load_generation_pipeline(config), TestPipeline(config, "cpu", torch.float32, False).pipe):
        scheduler = pipe.scheduler.config
        assert (scheduler.prediction_type, scheduler.rescale_betas_zero_snr) == ("v_prediction", True)
        # zero-terminal SNR: sampling starts from the last, pure-noise timestep
        pipe.scheduler.set_timesteps(4)
        assert pipe.scheduler.timesteps[0] == pipe.scheduler.config.num_train_timesteps - 1
    # and its guidance is rescaled, as diffusers' pipeline does it with guidance_rescale (an eps base's is not)
    pipe.set_progress_bar_config(disable=True)

    def latents(rescale):
        return pipe("1girl", num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="latent",
                    generator=generators([3]), guidance_rescale=rescale).images

    rendered = render(pipe, lambda x: x, "1girl", [3], steps=2, guidance=5.0, resolution=64)
    assert np.array_equal(np.asarray(rendered[0]), np.asarray(_postprocess(pipe, latents(ZERO_SNR_GUIDANCE_RESCALE))))
    assert not torch.equal(latents(ZERO_SNR_GUIDANCE_RESCALE), latents(0.0))


# --- test grids and scores ---------------------------------------------------------------------------

def test_dbnb_sample_renders_grids_of_full_and_lora_sdxl_checkpoints(runs):
    from dbnb.faces.cli import main

    full, lora = runs
    assert main(["sample", str(lora), *FAST, "test_wide=1.5", "--no-progress"]) == 0  # and the wide test image
    assert Image.open(lora / "tests" / "step-000002" / "p3-s1.png").size == (96, 64)
    for run in runs:
        result = sample_run(run, FAST, progress=False)  # the LoRA run's square images: made by the CLI above
        assert [r.name for r in result.rows] == ["base", "step-000001", "step-000002"]
        assert result.grids and all(g.is_file() for g in result.grids) and result.reused == (run == lora) * 18
        base, trained = (Image.open(result.image_path(r, result.prompts[0], 0)) for r in result.rows[::2])
        assert base.size == (64, 64) and base.tobytes() != trained.tobytes()  # the checkpoint was swapped in


def test_sdxl_runs_are_scored_with_clip_dino_and_ccip(runs, embedders, tmp_path):
    from dbnb.evaluate.scorers.ccip import write_stand_in_ccip
    from dbnb.prep.tagger import write_stand_in_tagger

    full, lora = runs
    clip = score_run(full, [*FAST, f"clip_model={embedders[0]}", f"dino_model={embedders[1]}"], progress=False)
    assert [r["checkpoint"] for r in clip.rows] == ["base", "step-000001", "step-000002"]
    assert all(-1.0 <= r["clip_i"] <= 1.0 and -1.0 <= r["dino"] <= 1.0 for r in clip.rows)
    ccip, wd14 = write_stand_in_ccip(tmp_path / "ccip", size=64), write_stand_in_tagger(tmp_path / "wd14", size=64)
    scored = score_run(lora, [*FAST, "score_with=ccip", f"ccip_model={ccip}", f"tagger_model={wd14}",
                              "test_flexibility_prompts=['{instance_prompt}, 1girl, solo, school uniform']"],
                       progress=False)
    assert all(0.0 <= r["ccip"] <= 1.0 and 0.0 <= r["tag_adherence"] <= 1.0 for r in scored.rows)



# --- the report and the model card -------------------------------------------------------------------

def test_the_report_and_card_name_the_sdxl_base_how_it_samples_and_where_the_file_goes(runs):
    import yaml

    from dbnb.ship.export import export

    full, lora = runs
    report = report_markdown(full)
    base = report.split("## ベースモデル / Base model\n", 1)[1].split("\n## ", 1)[0]
    assert "SDXL (sdxl); v-prediction with zero-terminal SNR: render it as v-prediction" in base
    assert "zsnr on" in base and base.rstrip().endswith("clip skip 2")
    # settings are compared with SDXL's defaults (FAMILY_DEFAULTS), not SD 1.x's 512 px
    assert "(`resolution`): 64 (preset: 1024)" in report and "(`use_lora`): OFF (preset: ON)" in report
    card = model_card(lora, export(lora).path).read_text(encoding="utf-8")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    # NoobAI's licence binds what is trained from it, and the Hub links the card to it by repo id
    assert (meta["license"], meta["license_name"]) == ("other", "fair-ai-public-license-1.0-sd")
    assert meta["base_model"] == "Laxhar/noobai-XL-Vpred-1.0" and "base model: `Laxhar/noobai-XL-Vpred-1.0`" in body
    assert {"stable-diffusion-xl", "lora"} <= set(meta["tags"]) and "stable-diffusion" not in meta["tags"]
    assert "learning rate 0.01" in body  # lora_learning_rate: what the adapters learnt at
    assert "LoRA of Stable Diffusion XL" in body and "a LoRA in kohya's layout for SDXL bases" in body
    assert "1.x" not in body and "SD layout" not in body and "v-prediction with zero-terminal SNR" in body
