"""One kind of examples (instance or class) at their aspect buckets: an ImageSet per bucket,
and the size conditioning of each picture for a family conditioned on it (SDXL's original size,
crop offsets and target size; SD 1.x reads none of it)."""
from __future__ import annotations

import torch

from dbnb.data.buckets import Bucket, cover, picture_maker, picture_size
from dbnb.data.dataset import CaptionRules, Example, ImageSet
from dbnb.family.base import SIZE_INPUTS


class BucketedImages:
    """`sets[bucket]`: the ImageSet of the examples `members[bucket]` names, made at that bucket's
    size (an example may be in several: the class pictures a bucket borrows, see BucketPlan).
    `conditioning[bucket]`: one row per picture, (original height, width, crop top, crop left,
    bucket height, width, crop left when mirrored)."""

    def __init__(self, examples: list[Example], members: dict[Bucket, tuple[int, ...]], tokenizers,
                 background: str, hflip: bool, captions: CaptionRules = CaptionRules(), alpha_mask: bool = False,
                 borrowing: frozenset[Bucket] = frozenset()):
        sizes = [picture_size(e) for e in examples]  # before the sets take the pictures the check kept
        self.examples = examples
        self.sets: dict[Bucket, ImageSet] = {}
        self.conditioning: dict[Bucket, torch.Tensor] = {}
        # A picture the check kept at its own bucket goes to that bucket's set, so those sets are
        # made before the ones of the buckets borrowing every picture (BucketPlan.borrowing).
        for bucket in sorted(members, key=lambda b: b in borrowing):
            picks = members[bucket]
            self.sets[bucket] = ImageSet([examples[i] for i in picks], tokenizers, 0, False, background, hflip,
                                         captions, alpha_mask, picture=picture_maker(bucket, background, alpha_mask))
            self.conditioning[bucket] = torch.tensor([size_row(sizes[i], bucket) for i in picks], dtype=torch.long)
        self.sets = dict(sorted(self.sets.items()))

    def __len__(self):
        return len(self.examples)

    @property
    def cut(self) -> list:
        """Prompts past 75 tokens (see ImageSet.cut), each example once."""
        return list({id(e): (e, n) for images in self.sets.values() for e, n in images.cut}.values())

    def drop_pictures(self) -> None:
        for images in self.sets.values():
            images.drop_pictures()

    def without_loss(self) -> list:
        return sorted({p for images in self.sets.values() for p in images.without_loss()})

    def size_inputs(self, bucket: Bucket, indices: list[int], flips: torch.Tensor) -> dict[str, torch.Tensor]:
        """The picks' size conditioning, [N, 2] each; a mirrored pick's crop is measured from
        the other side, as its pixels are."""
        rows = self.conditioning[bucket][indices]
        left = torch.where(flips, rows[:, 6], rows[:, 3])
        return dict(zip(SIZE_INPUTS, (rows[:, 0:2], torch.stack([rows[:, 2], left], dim=1), rows[:, 4:6])))


def size_row(size: tuple[int, int], bucket: Bucket) -> list[int]:
    (width, height), ((resized_width, _), (top, left)) = size, cover(size, bucket)
    return [height, width, top, left, bucket[1], bucket[0], resized_width - bucket[0] - left]
