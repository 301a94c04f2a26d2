"""Cached text embeddings (cache_text_embeddings): with the text encoders frozen, every prompt a
batch can carry is encoded once before training and each batch's conditioning is looked up, so
the encoders can leave the GPU for the run (SDXL's two: about 1.6 GB in fp16, what lets SDXL LoRA
fit a 16 GB T4).

The prompts are known before the first step: each picture's own (its template with [filewords]
filled in) and, with caption_dropout_rate, the empty one. Shuffled or dropped tags would make
new ones every step, which the config refuses beside this setting. A batch's prompts are found
by their token ids, which the batches carry anyway, so a prompt tokenized again at a step (caption
dropout on) finds the entry of the same words.
"""
from __future__ import annotations

import torch

from dbnb.core.progress import bar
from dbnb.data.batches import Batches, module_device
from dbnb.data.dataset import tokenize_prompts
from dbnb.family.base import Family

# Prompts encoded at once: the encoders' activations stay small next to the weights.
CHUNK = 16


def prompt_key(inputs: dict[str, torch.Tensor], names: tuple[str, ...], row: int) -> bytes:
    """Row `row`'s token ids of every token input: what tells one prompt from another."""
    return b"".join(inputs[name][row].numpy().tobytes() for name in names)


class TextCache:
    """The conditioning of each distinct prompt, found by its token ids (`prompt_key`)."""

    def __init__(self, names: tuple[str, ...], rows: dict[bytes, int], conditioning: dict[str, torch.Tensor],
                 family: Family):
        self.names, self.rows, self.conditioning, self.family = names, rows, conditioning, family

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch's conditioning from its (host) inputs: the cached rows of its prompts,
        and what the family makes of its other inputs (SDXL's time ids from the size inputs)."""
        try:
            picks = [self.rows[prompt_key(inputs, self.names, i)] for i in range(len(inputs[self.names[0]]))]
        except KeyError:
            raise RuntimeError("cache_text_embeddings: a batch carries a prompt that was not cached; the "
                               "caption rules made one the cache did not foresee. Set cache_text_embeddings=false "
                               "and report this.") from None
        looked = {name: rows[picks] for name, rows in self.conditioning.items()}
        sizes = getattr(self.family, "size_conditioning", None)  # optional (dbnb.family.base.Family)
        return {**looked, **(sizes(inputs) if sizes is not None else {})}


def prompt_inputs(batches: Batches, empty_prompt: bool) -> dict[str, torch.Tensor]:
    """Every distinct prompt's token inputs (name -> [P, tokens]): the pictures' own, and the empty
    prompt's when caption dropout can make it."""
    sets = list(batches.parts().values())
    names = tuple(sets[0].inputs)
    found: dict[bytes, int] = {}
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    tables = [images.inputs for images in sets]
    if empty_prompt:
        tables.append(tokenize_prompts(sets[0].tokenizers, [""]))
    for table in tables:
        for i in range(len(table[names[0]])):
            key = prompt_key(table, names, i)
            if key not in found:
                found[key] = len(found)
                for name in names:
                    columns[name].append(table[name][i])
    return {name: torch.stack(rows) for name, rows in columns.items()}


@torch.no_grad()
def cache_text_embeddings(batches: Batches, encoder: torch.nn.Module, family: Family, empty_prompt: bool,
                          progress: bool = True, clip_skip: int = 0) -> TextCache:
    """Each distinct prompt of `batches` (and the empty one with `empty_prompt`) encoded once by the
    frozen `encoder` on its device, read at `clip_skip` as the loss reads it. Kept in RAM, not VRAM (SDXL: 308 KiB a prompt in fp16, so
    thousands of captioned class images would take back what parking the encoders freed); the loss
    copies a batch's rows to the device."""
    device = module_device(encoder)
    inputs = prompt_inputs(batches, empty_prompt)
    names = tuple(inputs)
    count = len(inputs[names[0]])
    parts: dict[str, list[torch.Tensor]] = {}
    was_training = encoder.training
    encoder.eval()  # as the loop runs a frozen encoder (optimizer_step): dropout off
    with bar(total=count, desc="caching text embeddings", unit="prompt", disable=not progress) as shown:
        for start in range(0, count, CHUNK):
            chunk = {name: ids[start:start + CHUNK].to(device) for name, ids in inputs.items()}
            for name, value in family.encode_prompts(encoder, chunk, clip_skip=clip_skip).items():
                parts.setdefault(name, []).append(value.cpu())
            shown.update(len(chunk[names[0]]))
    encoder.train(was_training)
    rows = {prompt_key(inputs, names, i): i for i in range(count)}
    return TextCache(names, rows, {name: torch.cat(values) for name, values in parts.items()}, family)
