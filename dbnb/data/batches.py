"""The training batches: the pictures read once, their latents (cached, or encoded live),
and one process's micro-batch at each step.

Randomness that shapes the result (data order, flips, noise, timesteps, caption shuffling)
is derived from (seed, micro-step, rank), never drawn from a global RNG, so a run resumed
after a lost session computes exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass

import torch

from dbnb.core.config import Config
from dbnb.data import dataset as data
from dbnb.data.bucketed import BucketedImages
from dbnb.data.buckets import BucketPlan, all_square_note, histogram_line, keep_bucketed, plan_buckets
from dbnb.family import base

if typing.TYPE_CHECKING:  # textcache imports this module
    from dbnb.data.textcache import TextCache

# --- randomness derived from (seed, step) ----------------------------------------------------

# Each consumer XORs its own high bit into the step's seed, so turning caption shuffling or
# dropout on leaves the flips, noise and timesteps of every step as they were.
CAPTION_STREAM = 1 << 62
DROPOUT_STREAM = 1 << 61


def step_seed(seed: int, micro_step: int, rank: int, stream: int = 0) -> int:
    """The one seed of (seed, micro-step, rank): the run's seed and step spread apart, then a
    slot per process (up to 64), then the consumer's `stream` bit."""
    return ((seed * 1_000_003 + micro_step) * 64 + rank) ^ stream


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, micro_step, rank))


def caption_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """Caption shuffling / dropout draw from their own stream (see CAPTION_STREAM)."""
    return torch.Generator().manual_seed(step_seed(seed, micro_step, rank, CAPTION_STREAM))


def dropout_seed(seed: int, micro_step: int, rank: int) -> int:
    return step_seed(seed, micro_step, rank, DROPOUT_STREAM)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting: a CUDA copy from pinned memory runs
    asynchronously (from pageable memory it blocks until done); elsewhere a plain `.to`."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# --- data --------------------------------------------------------------------------------------

@dataclass
class Batches:
    """Instance (and class) tensors plus what the loop needs to cut batches from them; with
    bucketing each kind is a BucketedImages and `plan` says which bucket each micro-batch is cut from."""
    instance: data.ImageSet | BucketedImages
    klass: data.ImageSet | BucketedImages | None
    latents: dict | None  # cached latent distributions: {(part, flipped): (mean, std)}, see `parts`
    plan: BucketPlan | None = None
    text: TextCache | None = None  # cached text embeddings (cache_text_embeddings), or None

    @property
    def epoch_len(self) -> int:
        if self.plan is not None:
            return self.plan.epoch_len
        return max(len(self.instance), len(self.klass) if self.klass else 0)

    def parts(self) -> dict:
        """The ImageSets by name: "instance" and "class", or with bucketing (kind, bucket) each."""
        kinds = {kind: images for kind, images in (("instance", self.instance), ("class", self.klass))
                 if images is not None}
        if self.plan is None:
            return kinds
        return {(kind, bucket): s for kind, images in kinds.items() for bucket, s in images.sets.items()}


def epoch_length(config: Config, examples: tuple[list[data.Example], list[data.Example]]) -> int:
    """Pictures in one epoch: the longer of the two sets (the shorter one repeats), or with
    bucketing the sum over the buckets (`BucketPlan.lengths`); known from the examples alone, so
    the run's length is known before the model loads."""
    if config.bucketing:
        return plan_buckets(config, *examples).epoch_len
    return max(map(len, examples))


@dataclass
class MicroBatch:
    """One process's micro-batch: latents drawn from the autoencoder's distribution (not yet
    scaled), the family's token inputs by name (SD 1.x: {"input_ids": ...}), the (seed, step)
    generator that also draws its noise and timesteps, the alpha mask (alpha_mask_loss) or
    None, and the conditioning looked up in the text cache (cache_text_embeddings) or None.
    Instance rows first, then class rows."""
    latents: torch.Tensor
    inputs: dict[str, torch.Tensor]
    generator: torch.Generator
    mask: torch.Tensor | None = None
    conditioning: dict[str, torch.Tensor] | None = None


def gather_examples(config: Config) -> tuple[list[data.Example], list[data.Example]]:
    """The instance and class pictures with their prompts, checked before the model loads or
    the run folder is made: a missing folder or caption stops here, leaving nothing behind."""
    concepts = data.concepts_from_config(config)
    # The check decodes every picture anyway: it keeps them squared (or at their bucket), so
    # read_images decodes none again.
    keep = (keep_bucketed(config) if config.bucketing else
            data.keep_square(config.resolution, config.center_crop, config.background_color, config.alpha_mask_loss))
    instance, klass = data.examples_for(concepts, config.with_prior_preservation, config.skip_bad_images, keep)
    if config.with_prior_preservation:
        klass = data.select_class_images(klass, config.num_class_images)
    return instance, klass


def read_images(config: Config, tokenizers, examples=None) -> Batches:
    """The pictures read once, with the token inputs of every tokenizer (the family's
    `Models.tokenizers`: name -> tokenizer; a lone tokenizer is {"input_ids": it})."""
    instance, klass = examples or gather_examples(config)
    batches = (bucketed_images(config, tokenizers, instance, klass) if config.bucketing else
               Batches(*(data.ImageSet(ex, tokenizers, config.resolution, config.center_crop, config.background_color,
                                       config.hflip, data.CaptionRules.from_config(config), config.alpha_mask_loss)
                         if ex else None for ex in (instance, klass)), None))
    sets = [batches.instance] + ([batches.klass] if batches.klass is not None else [])
    data.warn_cut([c for images in sets for c in images.cut], sum(map(len, sets)))
    if batches.klass is not None:
        data.refuse_masked_out_class_images(batches.klass)
    return batches


def bucketed_images(config: Config, tokenizers, instance, klass) -> Batches:
    """The pictures at their aspect buckets (bucketing), with the plan that draws from them."""
    plan = plan_buckets(config, instance, klass)
    make = lambda ex, members, borrowing=frozenset(): BucketedImages(  # noqa: E731
        ex, members, tokenizers, config.background_color, config.hflip, data.CaptionRules.from_config(config),
        config.alpha_mask_loss, borrowing)
    if os.environ.get("RANK", "0") == "0":  # said once, not by every DDP worker
        tally = plan.histogram()
        print(f"[dbnb] bucketing: instance pictures per bucket (width x height): {histogram_line(tally)}"
              f"{all_square_note(tally, config)}", flush=True)
    return Batches(make(instance, plan.instance), make(klass, plan.klass, plan.borrowing) if klass else None, None,
                   plan)


# The latent cache encodes at most CACHE_CHUNK pictures at once, and at most CACHE_PIXELS pixels:
# 8 pictures up to SD 1.x's 512 px as before, 2 at SDXL's 1024 (8 there would ask a T4 for 20 GiB
# of autoencoder activations: dbnb.train.steptrace).
CACHE_CHUNK = 8
CACHE_PIXELS = CACHE_CHUNK * 512 * 512


def cache_chunk(height: int, width: int) -> int:
    """How many pictures of `height` x `width` the latent cache encodes at once."""
    return max(1, min(CACHE_CHUNK, CACHE_PIXELS // (height * width)))


@torch.no_grad()
def cache_latents(batches: Batches, autoencoder, hflip: bool, family=None) -> dict:
    """Latent distribution (mean, std) of every image, flipped ones too when hflip is on
    (`family`: SD 1.x unless given)."""
    family, device = family or base.default(), module_device(autoencoder)
    cache = {}
    for part, images in batches.parts().items():
        for flipped in (False, True) if hflip else (False,):
            means, stds = [], []
            for chunk in images.images.split(cache_chunk(*images.images.shape[-2:])):
                chunk = data.unit_range(to_device(chunk, device))
                dist = family.encode_images(autoencoder, chunk.flip(-1) if flipped else chunk)
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
            cache[(part, flipped)] = (torch.cat(means), torch.cat(stds))
    return cache


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter's device, as diffusers' `.device`)."""
    return next(module.parameters()).device


def latent_batch(batches: Batches, part, idx: list[int], flips: torch.Tensor, autoencoder, family=None):
    """(mean, std) of the latent distributions of one batch of `part` (see Batches.parts), from the
    cache or the autoencoder."""
    if batches.latents is not None:  # chosen by tensor ops: no per-pick read of `flips`
        mean, std = (t[idx] for t in batches.latents[(part, False)])
        if (part, True) in batches.latents:
            flipped, where = batches.latents[(part, True)], flips[:, None, None, None]
            mean, std = torch.where(where, flipped[0][idx], mean), torch.where(where, flipped[1][idx], std)
        return mean, std
    pictures = batches.parts()[part].picks(idx, flips)
    family = family or base.default()
    dist = family.encode_images(autoencoder, data.unit_range(to_device(pictures, module_device(autoencoder))))
    # Left on the autoencoder's device: bringing them to the host would wait for the GPU every micro-step.
    return dist.mean.float(), dist.std.float()


def next_batch(batches: Batches, micro_step: int, config: Config, rank: int, world: int, autoencoder,
               family=None) -> MicroBatch:
    """One process's micro-batch at `micro_step` (`family`: SD 1.x unless given)."""
    g = step_generator(config.seed, micro_step, rank)
    captions = caption_generator(config.seed, micro_step, rank)
    means, stds, inputs, masks = [], [], [], []
    for part, images, idx in batch_parts(batches, micro_step, config, rank, world):
        flips = images.flips(len(idx), g)
        mean, std = latent_batch(batches, part, idx, flips, autoencoder, family)
        means.append(mean)
        stds.append(std)
        inputs.append(images.token_inputs(idx, captions))
        if batches.plan is not None:  # the size conditioning, for a family conditioned on it
            inputs[-1].update(sized_kind(batches, part).size_inputs(part[1], idx, flips))
        masks.append(images.mask_batch(idx, flips))
    mean, std = torch.cat(means), torch.cat(stds)
    latents = mean + std * to_device(torch.randn(mean.shape, generator=g), mean.device)
    joined = {name: torch.cat([part[name] for part in inputs]) for name in inputs[0]}
    return MicroBatch(latents, joined, g, torch.cat(masks) if masks[0] is not None else None,
                      batches.text.lookup(joined) if batches.text is not None else None)


def batch_parts(batches: Batches, micro_step: int, config: Config, rank: int, world: int) -> list:
    """(part, ImageSet, picks) of the micro-batch: its instance rows, then its class rows."""
    if batches.plan is not None:
        bucket, instance, klass = batches.plan.picks(micro_step, rank, world)
        parts = [(("instance", bucket), instance)] + ([(("class", bucket), klass)] if batches.klass else [])
        return [(part, batches.parts()[part], idx) for part, idx in parts]
    pos = data.batch_positions(micro_step, config.train_batch_size, rank, world, batches.epoch_len, config.seed)
    parts = [("instance", batches.instance, [p % len(batches.instance) for p in pos])]
    if batches.klass is not None:
        parts.append(("class", batches.klass, [p % len(batches.klass) for p in pos]))
    return parts


def sized_kind(batches: Batches, part) -> BucketedImages:
    return batches.instance if part[0] == "instance" else batches.klass
