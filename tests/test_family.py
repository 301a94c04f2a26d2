"""The model-family seam (issue 31 item 2): the trainer and the batches never name a family's
components; SD 1.x losses are bitwise what they were before the seam; and a deliberately
different stand-in family trains, saves and resumes through the real trainer."""
import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_learnt_and_resumed_exactly, assert_test_grids

from dbnb.data.batches import cache_latents, next_batch, read_images
from dbnb.family import base, lora
from dbnb.family.sd1.family import SD1
from dbnb.train.loss import diffusion_loss, min_snr_weights

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("dbnb/train/loop.py", "dbnb/train/loss.py", "dbnb/data/batches.py", "dbnb/run/checkpoints.py",
           "dbnb/run/folder.py", "dbnb/train/diskplan.py", "dbnb/train/previews.py", "dbnb/family/lora.py",
           "dbnb/evaluate/score.py", "dbnb/core/source_names.py", "dbnb/ship/hashes.py", "dbnb/ship/report.py",
           "dbnb/ship/export.py", "dbnb/ship/kohya.py", "dbnb/prep/classimages.py",
           "dbnb/family/render.py", "dbnb/evaluate/sample.py")
SD1_NAMES = {"unet", "text_encoder", "vae", "tokenizer", "UNet2DConditionModel", "CLIPTextModel", "AutoencoderKL"}
# Names a neutral module may still spell because users read them: export's `vae` is the --vae option (the
# webui's word), sample's the key of the VAE setting in the grid's settings record.
USERS_WORDS = {"dbnb/ship/export.py": {"vae"}, "dbnb/evaluate/sample.py": {"vae"}}


def _named(tree: ast.AST) -> set[str]:
    """Every identifier a module spells: names, attributes, arguments, definitions, imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name for a in node.names)
            names.update(a.name for a in node.names)
    return names


def _modules(tree: ast.AST) -> set[str]:
    """The modules a module imports, and every string that spells a dbnb module (importlib)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "dbnb." in node.value:
            found.add(node.value)
    return found


@pytest.mark.parametrize("path", GENERIC)
def test_the_trainer_and_the_batches_never_name_a_family_component(path):
    tree = ast.parse((ROOT / path).read_text())
    named = _named(tree) & SD1_NAMES - USERS_WORDS.get(path, set())
    assert not named, f"{path} names {sorted(named)}: ask the family"
    assert not [m for m in _modules(tree) if "dbnb.family.sd1" in m], f"{path} imports SD 1.x itself"


def test_family_modules_stay_below_the_trainer():
    for path in (ROOT / "dbnb" / "family").rglob("*.py"):
        for module in _modules(ast.parse(path.read_text())):
            assert not module.startswith(("dbnb.train", "dbnb.data", "dbnb.run")), (path, module)


def test_sd1_is_the_family_of_every_model_nothing_else_claims(tiny_dir):
    assert isinstance(SD1, base.Family)
    assert base.for_model(str(tiny_dir)) is SD1 and base.default() is SD1


# --- SD 1.x: bitwise as before the seam --------------------------------------------------------

def _loss_before_the_seam(unet, text_encoder, noise_scheduler, latents, input_ids, g, mask, config,
                          scaling_factor, encode_with_grad=False):
    """dbnb.train.loop.diffusion_loss as it was before the family seam, verbatim (CPU)."""
    latents = latents * scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    if config.offset_noise:
        noise = noise + config.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.set_grad_enabled(encode_with_grad):
        hidden = text_encoder(input_ids)[0]
    pred = unet(noisy, timesteps, hidden).sample.float()
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_pixel = F.mse_loss(pred, target.float(), reduction="none")
    if mask is not None:
        per_pixel = per_pixel * F.interpolate(mask.to(per_pixel.dtype), size=per_pixel.shape[-2:], mode="area")
    per_sample = per_pixel.mean(dim=(1, 2, 3))
    if config.snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)
    if config.with_prior_preservation:
        instance, klass = per_sample.chunk(2)
        return instance.mean() + config.prior_loss_weight * klass.mean()
    return per_sample.mean()


@pytest.mark.parametrize("settings", [
    dict(),
    dict(offset_noise=0.1, snr_gamma=5.0, with_prior_preservation=True, num_class_images=6, prior_loss_weight=0.7),
    dict(alpha_mask_loss=True, hflip=True, shuffle_caption=True, caption_dropout_rate=0.3, snr_gamma=1.0),
    dict(v_prediction=True),
])
def test_sd1_losses_are_bitwise_what_they_were(make_config, settings):
    v_prediction = settings.pop("v_prediction", False)
    config = make_config(train_batch_size=2, **settings)
    models = SD1.load(config, torch.device("cpu"), torch.float32)
    if v_prediction:
        from diffusers import DDPMScheduler
        models.noise_scheduler = DDPMScheduler.from_config(models.noise_scheduler.config,
                                                           prediction_type="v_prediction")
    batches = read_images(config, models.tokenizers)
    batches.latents = cache_latents(batches, models.autoencoder, config.hflip)
    for micro_step in range(3):
        batch = next_batch(batches, micro_step, config, 0, 1, models.autoencoder)
        assert set(batch.inputs) == {"input_ids"}
        state = batch.generator.get_state()
        new = diffusion_loss(models.denoiser, models.encoder, models.noise_scheduler, batch, config,
                             family=SD1, scaling_factor=models.latent_scale)
        old = _loss_before_the_seam(models.denoiser, models.encoder, models.noise_scheduler, batch.latents,
                                    batch.inputs["input_ids"], torch.Generator().set_state(state), batch.mask,
                                    config, models.latent_scale)
        assert torch.equal(new, old), (micro_step, new.item(), old.item())


# --- a second family: two text encoders, their hidden states side by side -------------------------

class DualEncoderFamily:
    """A deliberately different stand-in: the tiny SD topology with TWO CLIP text encoders (and
    two tokenizers, one token input each) whose hidden states are concatenated, so the UNet's
    cross_attention_dim is the sum of their widths. Recognized by the marker file in its folder."""
    name = "dual-encoder (test)"
    parts = base.Parts(denoiser=base.Part("denoiser", "denoiser", "diffusion_pytorch_model.safetensors", "lora_dn_"),
                       encoder=base.Part("encoders", "text encoders", "model.safetensors", "lora_enc_"))
    single_file = None  # no one-file format: these tests export nothing
    kohya_version, clip_skip, clip_skips = "dual_encoder_test", 1, range(1, 2)  # conditioned on the last layers
    MARKER = "dual_encoder_family.json"
    WIDTHS = (32, 16)

    def recognizes(self, source):
        return (Path(source) / self.MARKER).is_file()

    @classmethod
    def make_model(cls, folder: Path) -> Path:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from dbnb.family.sd1.skeleton import TINY_TEXT, TINY_UNET, TINY_VAE, skeleton_config

        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        torch.manual_seed(0)
        UNet2DConditionModel(**strip(skeleton_config("unet", **{**TINY_UNET, "cross_attention_dim": sum(cls.WIDTHS)}))
                             ).save_pretrained(folder / "denoiser")
        AutoencoderKL(**strip(skeleton_config("vae", **TINY_VAE))).save_pretrained(folder / "autoencoder")
        for k, width in enumerate(cls.WIDTHS):
            text = {k: v for k, v in skeleton_config("text_encoder", **TINY_TEXT).items()
                    if k not in ("architectures", "torch_dtype")}
            text.update(hidden_size=width, intermediate_size=2 * width, projection_dim=width)
            CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(folder / f"encoder_{k}")
        (folder / cls.MARKER).write_text(json.dumps({"widths": cls.WIDTHS}))
        return folder

    def open(self, source, *, autoencoder="", revision="", dtype=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from dbnb.family.sd1.skeleton import SKELETON

        folder = Path(source)
        encoder = torch.nn.ModuleDict({f"encoder_{k}": CLIPTextModel.from_pretrained(folder / f"encoder_{k}")
                                       for k in range(len(self.WIDTHS))})
        autoencoder = AutoencoderKL.from_pretrained(folder / "autoencoder")
        tokenizer = CLIPTokenizer.from_pretrained(SKELETON / "tokenizer", model_max_length=77)
        models = base_models(denoiser=UNet2DConditionModel.from_pretrained(folder / "denoiser"), encoder=encoder,
                             autoencoder=autoencoder, tokenizers={"input_ids": tokenizer, "input_ids_2": tokenizer},
                             noise_scheduler=None, latent_scale=autoencoder.config.scaling_factor, pipe=None, base={})
        for part in (models.denoiser, encoder, autoencoder):
            part.to(dtype=dtype)
        return models

    def load(self, config, device, weight_dtype):
        from diffusers import DDPMScheduler

        from dbnb.family.sd1.skeleton import skeleton_config

        models = self.open(config.pretrained_model_name_or_path)
        denoiser, encoder = models.denoiser, models.encoder
        models.autoencoder.requires_grad_(False)
        models.base = {"denoiser": str(sum(p.double().sum().item() for p in denoiser.parameters()))}
        if config.use_lora:  # on both parts when lora_text_encoder_rank says so, under the family's names
            lora.add_adapters(denoiser, encoder, lora.Spec.from_config(config), self, seed=config.seed)
        else:
            assert not config.trains_text_encoder, "the stand-in fine-tunes its denoiser only"
            encoder.requires_grad_(False)
        for part in (denoiser, models.autoencoder, encoder):
            part.to(device)
        models.noise_scheduler = DDPMScheduler.from_config(skeleton_config("scheduler"))
        return models

    def adapter_targets(self, denoiser, encoder, spec):
        from dbnb.family.sd1.adapters import targets

        return targets(denoiser, encoder, spec)  # SD 1.x's blocks: the same UNet, CLIP layers inside the ModuleDict

    def pipeline(self, models, denoiser):
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        from dbnb.family.sd1.skeleton import skeleton_config

        # diffusers' SD pipeline, its one text encoder the two side by side (they read the same tokens)
        return StableDiffusionPipeline(vae=models.autoencoder, text_encoder=JoinedEncoders(models.encoder),
                                       tokenizer=models.tokenizers["input_ids"], unet=denoiser,
                                       scheduler=DDPMScheduler.from_config(skeleton_config("scheduler")),
                                       safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def encode_images(self, autoencoder, images):
        with torch.no_grad():
            return autoencoder.encode(images.to(next(autoencoder.parameters()).device)).latent_dist

    def decode_latents(self, autoencoder, latents):
        with torch.no_grad():
            device = next(autoencoder.parameters()).device
            return autoencoder.decode(latents.to(device) / autoencoder.config.scaling_factor).sample

    def encode_prompts(self, encoder, inputs, clip_skip=0):
        base.resolve_clip_skip(self, clip_skip)
        first = encoder["encoder_0"](inputs["input_ids"])[0]
        second = encoder["encoder_1"](inputs["input_ids_2"])[0]
        return {"hidden": torch.cat([first, second], dim=-1)}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        assert conditioning["hidden"].shape[-1] == sum(self.WIDTHS)
        return denoiser(noisy, timesteps, conditioning["hidden"]).sample


base_models = base.Models


class JoinedEncoders(torch.nn.Module):
    """The stand-in's encoders as the one text encoder a StableDiffusionPipeline calls."""

    def __init__(self, encoders: torch.nn.ModuleDict):
        super().__init__()
        self.encoders = encoders
        self.config = encoders["encoder_0"].config

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask=None):
        return (torch.cat([encoder(input_ids)[0] for encoder in self.encoders.values()], dim=-1),)


@pytest.fixture
def dual_family(tmp_path_factory, monkeypatch):
    """The stand-in registered (for this test only) and its model folder."""
    family = DualEncoderFamily()
    monkeypatch.setattr(base, "FAMILIES", list(base.FAMILIES))
    base.register(family)
    return family, DualEncoderFamily.make_model(tmp_path_factory.mktemp("dual") / "dual-model")


def test_a_second_family_trains_saves_and_resumes_through_the_real_trainer(make_config, dual_family):
    from dbnb.run.checkpoints import RunFolder
    from dbnb.train.loop import train

    family, model = dual_family
    assert base.for_model(str(model)) is family and base.for_model("org/any-sd1-model") is base.default()
    settings = {"pretrained_model_name_or_path": str(model), "max_train_steps": 4, "save_every_steps": 2,
                "learning_rate": 1e-3}
    config = lambda **kw: make_config(**{**settings, **kw})  # noqa: E731
    # the uninterrupted run renders previews too: through the family's pipeline, never a "unet" slot
    straight = train(config(run_name="straight", sample_every_steps=2, num_samples=1, sample_steps=2),
                     progress=False)
    first = train(config(run_name="resumed", max_train_steps=2), progress=False)
    resumed = train(config(run_name="resumed"), resume="latest", progress=False)

    assert (straight.step, first.step, resumed.step) == (4, 2, 4)
    log = [json.loads(x) for x in (resumed.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert json.loads(RunFolder(resumed.run_dir).base_path.read_text())["family"] == family.name
    previews = RunFolder(straight.run_dir).preview_grids()
    assert [p.parent.name for p in previews] == ["step-000002", "step-000004"], previews
    assert [p.name for p in first.checkpoints] == ["step-000002"] and (first.checkpoints[0] / "denoiser").is_dir()
    # resumed exactly where it stopped, and its test grids through the family's open() and pipeline()
    assert_learnt_and_resumed_exactly(straight.run_dir, resumed.run_dir,
                                      model / "denoiser" / "diffusion_pytorch_model.safetensors", 4)
    assert_test_grids(resumed.run_dir, 4)


def test_a_second_family_trains_lora_adapters_under_its_own_names_and_resumes_them(make_config, dual_family):
    from dbnb.run.checkpoints import RunFolder
    from dbnb.train.loop import train

    family, model = dual_family
    settings = {"pretrained_model_name_or_path": str(model), "max_train_steps": 2, "save_every_steps": 1,
                "use_lora": True, "lora_rank": 4, "lora_conv_rank": 2, "lora_text_encoder_rank": 2,
                "use_ema": True, "keep_last_n": 2, "learning_rate": 1e-3}
    config = lambda **kw: make_config(**{**settings, **kw})  # noqa: E731
    straight = train(config(run_name="straight"), progress=False)
    train(config(run_name="resumed", max_train_steps=1), progress=False)
    resumed = train(config(run_name="resumed"), resume="latest", progress=False)

    checkpoint = RunFolder(resumed.run_dir).pick(2)
    assert checkpoint.kind == "lora" and checkpoint.parts == {"denoiser", "encoders", "ema", "state"}
    assert sorted(p.name for p in (checkpoint.path / "lora").iterdir()) == [
        "adapters.json", "denoiser.safetensors", "ema.safetensors", "encoders.safetensors"]
    for ema in (False, True):  # resumed exactly, the EMA too
        _, *got = checkpoint.adapters(ema)
        _, *want = RunFolder(straight.run_dir).pick(2).adapters(ema)
        for mine, theirs in zip(got, want):
            assert mine and mine.keys() == theirs.keys()
            for k in mine:
                torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-6, msg=k)
    # onto a fresh base model: the family says where the adapters go
    fresh = family.open(str(model))
    checkpoint.load_into(fresh.denoiser, fresh.encoder)
    _, denoiser, encoder = checkpoint.adapters()
    for part, saved in ((fresh.denoiser, denoiser), (fresh.encoder, encoder)):
        assert lora.adapter_state(part).keys() == saved.keys()
        assert all(torch.equal(lora.adapter_state(part)[k], v) for k, v in saved.items())


def test_a_run_of_a_family_that_is_not_registered_says_so(make_config, dual_family, monkeypatch):
    from dbnb.run.checkpoints import RunFolder, RunFolderError
    from dbnb.train.loop import train

    family, model = dual_family
    run = train(make_config(pretrained_model_name_or_path=str(model), max_train_steps=1), progress=False).run_dir
    assert RunFolder(run).family is family
    monkeypatch.setattr(base, "FAMILIES", [])  # a later session that did not register it
    with pytest.raises(RunFolderError, match=r"family 'dual-encoder \(test\)' .* not registered here: register it"):
        RunFolder(run).pick(1)


def test_a_family_with_no_single_file_is_not_merged(dual_family, tmp_path):
    from dbnb.ship.merge import MergeError, merge

    _, folder = dual_family
    with pytest.raises(MergeError, match=r"'a' .* is a dual-encoder \(test\) model, and dbnb cannot merge"):
        merge([str(folder), str(folder)], labels=["a", "b"], out_file=tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()
