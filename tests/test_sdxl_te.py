"""Full DreamBooth on SDXL with both text encoders fine-tuned (issue 33, item 3): trained through the
real trainer with prior preservation and the EMA, resumed exactly, frozen at stop_text_encoder, each
encoder saved as its own transformers folder (text_encoders/te1, te2) that transformers and diffusers
load, and written by `dbnb export` into the single file the webui loads."""
import pytest
import torch

from dbnb.family.sdxl.family import SDXL
from dbnb.run.checkpoints import RunFolder, master_state

FULL = {"max_train_steps": 4, "save_every_steps": 2, "learning_rate": 1e-3, "train_text_encoder": True,
        "text_encoder_lr": 1e-3, "with_prior_preservation": True,
        "num_class_images": 6}  # the class images make_config writes: 2 per instance picture


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k].float(), b[k].float()) for k in b)


@pytest.fixture
def base_encoders(tiny_sdxl) -> dict:
    return SDXL.open(str(tiny_sdxl)).encoder.state_dict()


def test_both_encoders_learn_and_resume_exactly_with_the_ema(make_config, tiny_sdxl, base_encoders):
    from conftest import assert_learnt_and_resumed_exactly

    from dbnb.train.loop import train

    config = lambda **kw: make_config(**{"pretrained_model_name_or_path": str(tiny_sdxl), **FULL,  # noqa: E731
                                         "use_ema": True, **kw})
    straight = train(config(run_name="straight"), progress=False)
    train(config(run_name="resumed", max_train_steps=2), progress=False)
    resumed = train(config(run_name="resumed"), resume="latest", progress=False)

    checkpoint = RunFolder(resumed.run_dir).pick(4)
    assert checkpoint.parts == {"unet", "text_encoders", "ema", "state"}  # the EMA is the UNet's, as on SD 1.x
    assert_learnt_and_resumed_exactly(straight.run_dir, resumed.run_dir,
                                      tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors", 4)
    for name in ("text_encoders", "unet_ema"):  # the fp32 master copies a further resume continues from
        mine, theirs = (master_state(RunFolder(run.run_dir).pick(4), name) for run in (resumed, straight))
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")

    assert checkpoint.encoder_state().keys() == base_encoders.keys()
    # each learnt: the fp32 master copy, as the saved fp16 weights differ from the base by rounding alone
    learnt = master_state(checkpoint, "text_encoders")
    for member in ("te1", "te2"):
        assert _differs({k: v for k, v in learnt.items() if k.startswith(member)},
                        {k: v for k, v in base_encoders.items() if k.startswith(member)}), member


def test_encoders_stop_at_stop_text_encoder_load_in_diffusers_and_export(make_config, tiny_sdxl, tmp_path,
                                                                          base_encoders):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dbnb.faces.cli import main
    from dbnb.family.base import under
    from dbnb.train.loop import train

    # stop_text_encoder=0.5 of 2 steps: the encoders learn in step 1 and are frozen for step 2
    run = train(make_config(pretrained_model_name_or_path=str(tiny_sdxl), **{
        **FULL, "max_train_steps": 2, "save_every_steps": 1, "stop_text_encoder": 0.5}), progress=False)
    checkpoint = RunFolder(run.run_dir).pick(2)
    trained = checkpoint.encoder_state(torch.float32)
    assert _differs(master_state(checkpoint, "text_encoders"), base_encoders)  # fp32: not rounding alone
    first = RunFolder(run.run_dir).pick(1)
    assert all(torch.equal(v, trained[k]) for k, v in first.encoder_state(torch.float32).items())
    assert _differs(checkpoint.denoiser_state(), first.denoiser_state())  # the UNet goes on learning

    # each encoder its own transformers folder, as diffusers' text_encoder/ and text_encoder_2/
    folder = checkpoint.path / "text_encoders"
    te1 = CLIPTextModel.from_pretrained(folder / "te1", local_files_only=True)
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "te2", local_files_only=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl, text_encoder=te1, text_encoder_2=te2, local_files_only=True,
        unet=UNet2DConditionModel.from_pretrained(checkpoint.path / "unet", local_files_only=True))
    for member, model in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        own = model.state_dict()
        assert all(torch.equal(own[k].float(), v) for k, v in under(trained, member).items()), member

    # the single file holds the trained encoders: read back equal (fp32 export of the fp16 save)
    assert main(["export", str(run.run_dir), "--to", str(tmp_path / "out"), "--precision", "fp32"]) == 0
    [exported] = sorted((tmp_path / "out").glob("*.safetensors"))
    read = SDXL.open(str(exported)).encoder.state_dict()
    assert all(torch.equal(read[k], v) for k, v in trained.items() if not k.endswith("position_ids"))


def test_bigg_fine_tuned_whole_learns_at_text_encoder_2_lr(make_config, tiny_sdxl):
    """As kohya's learning_rate_te1 / te2: bigG's 695 M weights often learn slower than CLIP-L's."""
    from dbnb.core.config import ConfigError
    from dbnb.train import optimizers

    cpu = torch.device("cpu")
    config = make_config(pretrained_model_name_or_path=str(tiny_sdxl), **FULL, text_encoder_2_lr=2e-4)
    models = SDXL.load(config, cpu, torch.float32)

    def rates(c):
        built = optimizers.build(c, models.denoiser, models.encoder, 1, cpu, encoders=SDXL.parts.encoder.members)
        return built, [g["lr"] for g in built.param_groups]

    optimizer, lrs = rates(config)
    assert lrs == [1e-3, 1e-3, 2e-4]
    assert [id(p) for p in optimizer.param_groups[2]["params"]] == [id(p) for p in models.encoder["te2"].parameters()]
    assert rates(config.replace(text_encoder_2_lr=0.0))[1] == [1e-3] * 3  # 0: the first encoder's rate
    with pytest.raises(ConfigError, match=r"prodigy with .*text_encoder_2_lr=0.0002"):
        config.replace(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1.0)
