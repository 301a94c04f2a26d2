"""cache_text_embeddings: with the text encoders frozen, each prompt is encoded once before
training and every batch's conditioning is looked up. The runs train exactly as with the
encoders running every step (SD 1.x and SDXL, with bucketing's per-batch time ids), resume
exactly, and the config refuses what would make prompts the cache cannot know."""
import contextlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn.modules.module import register_module_forward_hook
from conftest import dataset_with_class_images

from dbnb.core.config import Config, ConfigError
from dbnb.data.batches import next_batch, read_images
from dbnb.data.textcache import cache_text_embeddings, prompt_inputs
from dbnb.family.sd1.family import SD1
from dbnb.run.checkpoints import RunFolder
from dbnb.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def captioned(tmp_path):
    """Three instance pictures with their own captions ([filewords]), a tall and two wide ones (with
    bucketing each batch has its own time ids), and six class images."""
    instance, klass = dataset_with_class_images(tmp_path / "data", n_instance=3, class_per_instance=2)
    for path, size, caption in zip(sorted(instance.glob("*.png")), ((48, 112), (112, 48), (112, 48)),
                                   ("smile, red hair", "looking back", "1girl, standing")):
        Image.open(path).convert("RGB").resize(size).save(path)
        path.with_suffix(".txt").write_text(caption)
    return instance, klass


def settings(captioned, tmp_path, model: Path, **overrides) -> dict:
    instance, klass = captioned
    return {**dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(instance), class_data_dir=str(klass),
                instance_prompt="[filewords]", instance_token="hnzk", class_token="girl", class_prompt="girl",
                with_prior_preservation=True, num_class_images=6, caption_dropout_rate=0.5, hflip=True,
                output_dir=str(tmp_path / "runs"), resolution=64, max_train_steps=4, save_every_steps=2,
                learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no",
                use_8bit_adam=False, gradient_checkpointing=False, train_text_encoder=False, deterministic=True),
            **overrides}


def losses(result) -> list[float]:
    return [json.loads(x)["loss"] for x in (result.run_dir / "logs" / "train.jsonl").read_text().splitlines()]


def trained(result, step: int) -> dict[str, torch.Tensor]:
    checkpoint = RunFolder(result.run_dir).pick(step)
    if checkpoint.kind == "lora":
        _, unet, _ = checkpoint.adapters()
        return unet
    return checkpoint.denoiser_state()


def assert_same_training(cached, live, step: int) -> None:
    assert losses(cached) == losses(live)  # bit for bit: the same conditioning reached the denoiser
    mine, theirs = trained(cached, step), trained(live, step)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


@contextlib.contextmanager
def encoder_calls():
    """The text encoder's forward calls while the block runs, counted."""
    from transformers import CLIPTextModel

    calls = []
    hook = register_module_forward_hook(
        lambda module, args, out: calls.append(1) if isinstance(module, CLIPTextModel) else None)
    try:
        yield calls
    finally:
        hook.remove()


def test_sd1_trains_and_resumes_exactly_as_with_the_encoder_running(captioned, tmp_path, tiny_dir):
    # at clip skip 2, as anime SD 1.x bases are used: the cache reads the layer the loss would
    config = lambda **kw: Config(**settings(captioned, tmp_path, tiny_dir, clip_skip=2, **kw))  # noqa: E731
    with encoder_calls() as live_calls:
        live = train(config(run_name="live"), progress=False)
    with encoder_calls() as cached_calls:
        cached = train(config(run_name="cached", cache_text_embeddings=True), progress=False)
    assert (len(live_calls), len(cached_calls)) == (4, 1)  # every step, or once for the 5 prompts before the first
    assert_same_training(cached, live, 4)
    # a lost session: the resumed run builds the cache again and ends where the straight one did
    train(config(run_name="resumed", cache_text_embeddings=True, max_train_steps=2), progress=False)
    resumed = train(config(run_name="resumed", cache_text_embeddings=True), resume="latest", progress=False)
    assert_same_training(resumed, cached, 4)


def test_sdxl_lora_with_bucketing_trains_and_resumes_exactly_with_cached_embeddings(captioned, tmp_path, tiny_sdxl):
    """Both encoders and the pooled embedding cached; the time ids still come from each batch's buckets."""
    lora = dict(use_lora=True, lora_rank=4, lora_text_encoder_rank=0, bucketing=True, max_train_steps=3,
                save_every_steps=1)
    config = lambda **kw: Config(**settings(captioned, tmp_path, tiny_sdxl, **{**lora, **kw}))  # noqa: E731
    live = train(config(run_name="live"), progress=False)
    cached = train(config(run_name="cached", cache_text_embeddings=True, sample_every_steps=3, num_samples=1,
                          sample_steps=2), progress=False)
    assert_same_training(cached, live, 3)
    assert [p.parent.name for p in RunFolder(cached.run_dir).preview_grids()] == ["step-000003"]
    train(config(run_name="resumed", cache_text_embeddings=True, max_train_steps=1), progress=False)
    resumed = train(config(run_name="resumed", cache_text_embeddings=True), resume="latest", progress=False)
    assert_same_training(resumed, cached, 3)


def test_every_prompt_a_batch_can_carry_is_cached_once(captioned, tmp_path, tiny_dir, capsys):
    """The pictures' own prompts, the class prompt once, the empty one with caption dropout; each
    batch finds its rows, the dropped prompts too."""
    from dbnb.family.sd1.load import load_pipeline

    config = Config(**settings(captioned, tmp_path, tiny_dir))
    pipe = load_pipeline(config.pretrained_model_name_or_path)
    batches = read_images(config, pipe.tokenizer)
    assert len(prompt_inputs(batches, empty_prompt=False)["input_ids"]) == 3 + 1  # 3 captions, 1 class prompt
    batches.text = cache_text_embeddings(batches, pipe.text_encoder, SD1, empty_prompt=True)
    assert len(batches.text) == 5 and "caching text embeddings" in capsys.readouterr().out
    empty = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    dropped = 0
    for m in range(8):
        batch = next_batch(batches, m, config, 0, 1, pipe.vae)
        dropped += sum(torch.equal(ids, empty) for ids in batch.inputs["input_ids"])
        with torch.no_grad():
            want = pipe.text_encoder(batch.inputs["input_ids"])[0]
        torch.testing.assert_close(batch.conditioning["hidden_states"], want, rtol=0, atol=1e-6)
    assert dropped  # caption_dropout_rate=0.5 made empty prompts, and they were found


@pytest.mark.parametrize("overrides, named", [
    (dict(train_text_encoder=True), ("cache_text_embeddings=true", "train_text_encoder=true",
                                     "train_text_encoder=false")),
    (dict(use_lora=True, lora_text_encoder_rank=4), ("cache_text_embeddings=true", "lora_text_encoder_rank=4",
                                                     "lora_text_encoder_rank=0")),
    (dict(shuffle_caption=True), ("cache_text_embeddings=true", "shuffle_caption=true")),
    (dict(caption_tag_dropout_rate=0.1), ("cache_text_embeddings=true", "caption_tag_dropout_rate=0.1")),
])
def test_what_the_cache_cannot_hold_is_refused_naming_both_settings(overrides, named):
    with pytest.raises(ConfigError) as refused:
        Config(cache_text_embeddings=True, **{"train_text_encoder": False, **overrides})
    assert all(name in str(refused.value) for name in named), str(refused.value)
    Config(cache_text_embeddings=True, train_text_encoder=False, caption_dropout_rate=0.1)  # a finite variant
