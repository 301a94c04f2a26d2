"""Aspect-ratio buckets (setting `bucketing`): which size each picture trains at, and the order
the micro-batches are drawn in, one bucket at a time.

Buckets hold about resolution² pixels, sides in steps of `bucket_step` between a min and a max
side. A picture goes to the bucket whose shape is closest to its own, is resized to cover it and
cropped (centred) by as little as that leaves; one that would be enlarged past
`bucket_upscale_limit` gets a smaller bucket of the same shape instead. Every micro-batch is cut
from one bucket, in an order that is a pure function of (seed, epoch) like the unbucketed one,
so a resumed run draws exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dbnb.data.dataset import LATENT_SCALE, epoch_order, list_images

Bucket = tuple[int, int]  # (width, height) in pixels
ORIENTATION = 0x0112      # EXIF tag; values 5-8 turn the stored picture a quarter
CLASS_STREAM = 1 << 41    # the class pictures' shuffles: a bit above every bucket_seed


def bucket_step(resolution: int) -> int:
    """64 px at SD resolutions (512 and up); finer below, down to one latent (8 px), so the tiny
    test models at 64 px still have more than one shape."""
    return max(LATENT_SCALE, min(64, resolution // 64 * LATENT_SCALE))


def side_limits(config) -> tuple[int, int]:
    """(min side, max side) of the buckets: the settings, or half and twice the resolution."""
    step = bucket_step(config.resolution)
    low = config.bucket_min_side or config.resolution // 2
    high = config.bucket_max_side or config.resolution * 2
    return max(step, math.ceil(low / step) * step), max(step, high // step * step)


def bucket_sizes(resolution: int, min_side: int, max_side: int) -> list[Bucket]:
    """Every (width, height) with sides in steps of `bucket_step` within [min_side, max_side] and
    the largest height that keeps the area within resolution² (kohya's make_buckets), both ways."""
    step, area, sizes = bucket_step(resolution), resolution * resolution, set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def aspect_distance(size: tuple[int, int], bucket: Bucket) -> float:
    """How far the two shapes are apart: |log of the ratio of their aspects| (tall and wide alike)."""
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def assign(size: tuple[int, int], sizes: list[Bucket], upscale_limit: float, step: int) -> Bucket:
    """The bucket of a picture of `size` (width, height): the closest shape (the larger of equals);
    when filling it would enlarge the picture more than `upscale_limit`, a bucket of its own: the
    picture enlarged by the limit, sides rounded down to `step` (kohya's bucket_no_upscale at 1)."""
    best = min(sizes, key=lambda b: (aspect_distance(size, b), -b[0] * b[1]))
    if max(best[0] / size[0], best[1] / size[1]) <= upscale_limit:
        return best
    # A shape far from every bucket (a 1:10 strip) could otherwise outgrow them: its own bucket
    # keeps within their largest area and side, as the memory plan (dbnb.train.planner) assumes.
    scale = min(upscale_limit, math.sqrt(max(w * h for w, h in sizes) / (size[0] * size[1])),
                max(map(max, sizes)) / max(size))
    return tuple(max(step, int(side * scale) // step * step) for side in size)


def nearest(bucket: Bucket, among: list[Bucket]) -> Bucket:
    """The bucket of `among` closest in shape to `bucket` (the larger of equals)."""
    return min(among, key=lambda b: (aspect_distance(bucket, b), -b[0] * b[1]))


def cover(size: tuple[int, int], bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) the picture is resized to, (top, left) of the bucket's crop in it): the
    smallest resize that covers the bucket, and the crop centred."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    resized = (max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale)))
    return resized, ((resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2)


def fit(image: Image.Image, bucket: Bucket) -> Image.Image:
    """`image` resized to cover `bucket`, then cropped to it (see `cover`)."""
    resized, (top, left) = cover(image.size, bucket)
    return image.resize(resized, Image.Resampling.LANCZOS).crop((left, top, left + bucket[0], top + bucket[1]))


def bucket_picture(loaded, bucket: Bucket, background: str,
                   alpha_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What training keeps of one decoded picture (`dbnb.data.pictures.Loaded`) at `bucket`: as
    `dbnb.data.dataset.square_picture` does for a square, [3, H, W] uint8 on `background`, and with
    `alpha_mask` its alpha cut the same way, area-averaged to the latent grid [1, H/8, W/8]."""
    from dbnb.data.pictures import flatten

    picture = np.asarray(fit(flatten(loaded.image, background), bucket), dtype=np.uint8)
    picture = torch.from_numpy(picture.copy()).permute(2, 0, 1).contiguous()
    if not alpha_mask:
        return picture, None
    grid = (bucket[1] // LATENT_SCALE, bucket[0] // LATENT_SCALE)
    if not loaded.has_alpha:
        return picture, torch.ones(1, *grid)
    alpha = np.asarray(fit(loaded.image.getchannel("A"), bucket), dtype=np.float32) / 255.0
    return picture, torch.nn.functional.interpolate(torch.from_numpy(alpha)[None, None], size=grid, mode="area")[0]


def picture_maker(bucket: Bucket, background: str, alpha_mask: bool):
    """(settings tag, make): an ImageSet's way to make its pictures at `bucket` (see ImageSet)."""
    return ("bucket", bucket, background, alpha_mask), functools.partial(bucket_picture, bucket=bucket,
                                                                          background=background, alpha_mask=alpha_mask)


def keep_bucketed(config):
    """`usable_images`' keep with bucketing: the picture made at its own bucket, tagged as
    `picture_maker` tags it, so the bucket's ImageSet takes it instead of decoding the file again."""
    def keep(loaded):
        bucket = assign_all([loaded.image.size], config)[0]
        settings, make = picture_maker(bucket, config.background_color, config.alpha_mask_loss)
        return settings, make(loaded)
    return keep


def picture_size(example) -> tuple[int, int]:
    """(width, height) of an example's picture as trained (EXIF orientation applied): noted by the
    check that decoded it, else read from the file's header."""
    if example.held is not None and example.held.size is not None:
        return example.held.size
    return file_size(example.path)


def file_size(path: Path) -> tuple[int, int]:
    """(width, height) of a picture file as trained (EXIF orientation applied), from its header."""
    with Image.open(Path(path)) as im:
        turned = im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
        return (im.size[1], im.size[0]) if turned else im.size


# --- the order: one bucket per micro-batch, a pure function of (seed, epoch) ----------------------

@dataclass(frozen=True)
class BucketPlan:
    """Which examples train at which bucket, and the micro-batches of each epoch.

    `instance[b]` / `klass[b]`: indices of the instance / class examples drawn at bucket b (a
    bucket no class picture is closest to draws on all of them, made at its size). `lengths[b]`:
    the positions bucket b takes in an epoch: the larger of its instance and own class pictures
    (the seed's epoch, per bucket), rounded up to whole micro-batches by repeating its pictures.
    `borrowing`: the buckets whose class pictures are all of them."""
    batch_size: int
    seed: int
    instance: dict[Bucket, tuple[int, ...]]
    klass: dict[Bucket, tuple[int, ...]]
    lengths: dict[Bucket, int]
    borrowing: frozenset[Bucket] = frozenset()

    @property
    def epoch_len(self) -> int:
        return sum(self.lengths.values())

    def picks(self, micro_step: int, rank: int, world: int) -> tuple[Bucket, list[int], list[int]]:
        """(bucket, instance picks, class picks) of one process's micro-batch, as positions in
        `instance[bucket]` / `klass[bucket]`. The stream of epochs is cut into micro-batches as
        `dbnb.data.dataset.batch_positions` cuts it, so processes take consecutive ones."""
        chunks = [(b, c) for b in sorted(self.lengths) for c in range(self.lengths[b] // self.batch_size)]
        epoch, offset = divmod((micro_step * world + rank) * self.batch_size, self.epoch_len)
        bucket, chunk = chunks[epoch_order(len(chunks), self.seed, epoch)[offset // self.batch_size]]
        first, seed = chunk * self.batch_size, bucket_seed(self.seed, bucket)
        members = self.instance[bucket]
        order = epoch_order(len(members), seed, epoch)
        instance = [order[(first + k) % len(members)] for k in range(self.batch_size)]
        if not self.klass:
            return bucket, instance, []
        # The class pictures cycle through whole shuffles of their pool, across epochs.
        pool, start = len(self.klass[bucket]), first + epoch * self.lengths[bucket]
        klass = [epoch_order(pool, seed | CLASS_STREAM, k // pool)[k % pool]
                 for k in range(start, start + self.batch_size)]
        return bucket, instance, klass

    def histogram(self) -> dict[Bucket, int]:
        """Instance pictures per bucket, the most used first."""
        return counts([b for b, members in self.instance.items() for _ in members])


def bucket_seed(seed: int, bucket: Bucket) -> int:
    """A seed of its own for each bucket's shuffles, small enough for `epoch_order` to spread
    by epoch within the generator's 64 bits."""
    return (seed * 1_000_003 + bucket[0] * 4099 + bucket[1]) % (1 << 40)


def grid(config) -> tuple[list[Bucket], int]:
    """(the buckets, the step of their sides) under `config`'s bucket settings."""
    return bucket_sizes(config.resolution, *side_limits(config)), bucket_step(config.resolution)


def assign_all(sizes: list[tuple[int, int]], config) -> list[Bucket]:
    """The bucket of each picture size (width, height) under `config`'s bucket settings."""
    buckets, step = grid(config)
    return [assign(size, buckets, config.bucket_upscale_limit, step) for size in sizes]


def kept_size(size: tuple[int, int], config) -> tuple[Bucket, bool]:
    """(the size prep's square_mode=keep writes a picture of `size` at, whether the picture was too
    small for it): the bucket training gives that shape, but never enlarged: a picture smaller than
    its bucket keeps its own size, sides rounded down to whole steps, and training enlarges it by
    at most bucket_upscale_limit, once. A picture written at its bucket trains at that bucket, as is."""
    buckets, step = grid(config)
    kept = assign(size, buckets, 1.0, step)
    return kept, kept not in buckets


def counts(buckets: list[Bucket]) -> dict[Bucket, int]:
    """Pictures per bucket, the most used first."""
    tally = {b: buckets.count(b) for b in set(buckets)}
    return dict(sorted(tally.items(), key=lambda item: (-item[1], item[0])))


def plan_buckets(config, instance, klass) -> BucketPlan:
    """The plan for the instance and class examples (`dbnb.data.dataset.Example`) under `config`."""
    own = assign_all([picture_size(e) for e in instance], config)
    used = sorted(set(own))
    members = {b: tuple(i for i, o in enumerate(own) if o == b) for b in used}
    theirs = [nearest(b, used) for b in assign_all([picture_size(e) for e in klass], config)]
    pools = {b: tuple(i for i, t in enumerate(theirs) if t == b) for b in used} if klass else {}
    lengths = {b: math.ceil(max(len(members[b]), len(pools.get(b, ()))) / config.train_batch_size)
               * config.train_batch_size for b in used}
    borrowing = frozenset(b for b, pool in pools.items() if not pool)
    pools = {b: pool or tuple(range(len(klass))) for b, pool in pools.items()}
    return BucketPlan(config.train_batch_size, config.seed, members, pools, lengths, borrowing)


def allot(tally: dict[Bucket, int], count: int) -> list[Bucket]:
    """`count` buckets in proportion to `tally`, spread so that any first N of them are in
    proportion too (the trainer uses the first num_class_images): each next one goes to the bucket
    furthest behind its share, the most used of equals."""
    total, given, out = sum(tally.values()), dict.fromkeys(tally, 0), []
    for k in range(count):
        bucket = max(tally, key=lambda b: (k + 1) * tally[b] / total - given[b])
        given[bucket] += 1
        out.append(bucket)
    return out


def class_image_sizes(config, count: int) -> list[Bucket]:
    """(width, height) of class images 0 .. count-1: with bucketing, the instance pictures'
    buckets in proportion, so each bucket has class pictures of its own shape; else squares."""
    if not (config.bucketing and config.instance_data_dir):
        return [(config.resolution, config.resolution)] * count
    pictures = list_images(config.instance_data_dir, "instance_data_dir")
    return allot(counts(assign_all([file_size(p) for p in pictures], config)), count)


def histogram_line(tally: dict[Bucket, int]) -> str:
    """'512x512: 4, 448x576: 2' — pictures per bucket, as the prep report and the run say it."""
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in tally.items())


def all_square_note(tally: dict[Bucket, int], config) -> str:
    """What to do when bucketing finds only square pictures (prep squared them): said after the
    histogram by the prep report and by the trainer; "" otherwise."""
    if list(tally) != [(config.resolution, config.resolution)]:
        return ""
    return (f" — every picture is square, so bucketing trains them as without it: prepare them with "
            f"square_mode=keep (now {config.square_mode}; notebook 02 or `dbnb prep`) for them to train at their "
            "own shape")


def main_bucket(plan: BucketPlan) -> Bucket:
    """The bucket most instance pictures train at (the larger of equals): previews render at its
    size, so a run of tall full-body pictures is previewed tall."""
    return max(plan.instance, key=lambda b: (len(plan.instance[b]), b[0] * b[1], b))
