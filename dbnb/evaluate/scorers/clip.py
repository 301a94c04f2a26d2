"""The CLIP / DINO scorer (`score_with=clip`, the default): the DreamBooth paper's metrics.

- fidelity — CLIP-I and DINO: the mean cosine similarity of every fidelity-prompt image's
  embedding to every instance image's (paper, Table 1: DreamBooth (SD) 0.803 / 0.668, real
  images 0.885 / 0.774). `fidelity` = their mean.
- flexibility — CLIP-T: the mean cosine similarity of each flexibility-prompt image to its
  prompt's CLIP text embedding. The text is the prompt with `{instance_prompt}` replaced by
  the class prompt ("girl, 1girl, solo, swimsuit, beach"): CLIP has never seen the rare
  token, so leaving it in only adds noise, and the base row is judged on the same text.
- language drift — CLIP-T of the class-prompt-alone images against the class prompt;
  `drift` = base − checkpoint (positive: the class word lost meaning). `class_clip_i` (their
  CLIP-I to the instance images) rising says the class word is turning into the character.

Embeddings come from transformers' CLIP and DINO ViT, fed by transformers' image processors
(shortest side to the model's size, centre square, bicubic, the model's mean and std).
"""
from __future__ import annotations

import math

import torch
from PIL import Image

from dbnb.evaluate.scorers.base import Panel, ScoreError, Series, Weighed, images_of, row_scores

COLUMNS = ("checkpoint", "step", "clip_i", "dino", "fidelity", "clip_t", "class_clip_t", "drift", "class_clip_i")
WEIGHED = Weighed("fidelity", "clip_t", "mean(CLIP-I, DINO)", "CLIP-T")
FIDELITY_SERIES = (Series("clip_i", "CLIP-I", "#1f77b4"), Series("dino", "DINO", "#ff7f0e"),
                   Series("fidelity", "fidelity", "#5a5a5a"))
FLEXIBILITY_SERIES = (Series("clip_t", "CLIP-T (flexibility)", "#2ca02c"),
                      Series("class_clip_t", "CLIP-T (class prompt)", "#9467bd"))
PANELS = (Panel("fidelity (cosine similarity)", FIDELITY_SERIES),
          Panel("CLIP-T (cosine similarity)", FLEXIBILITY_SERIES))


def image_processor(size: int, mean, std):
    """Shortest side to `size`, the centre square, bicubic, normalised: the CLIP model card's
    preprocessing, and DINO's with ImageNet's mean and std (the centre square rather than
    ViT's squash, so a wide picture is judged by its middle, as CLIP's is)."""
    import transformers  # lazy: loads transformers

    # transformers 5: the PIL backend by its own name (the plain name warns and falls back to it
    # without torchvision); 4.x has only the plain name, which is that backend.
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(mean), image_std=list(std))


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object (the projected embedding is pooler_output); 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Embedder:
    """Unit-length image (and, for CLIP, text) embeddings from one model."""

    def __init__(self, kind: str, model, processor, tokenizer=None, device: str = "cpu", batch_size: int = 32):
        self.kind, self.processor, self.size = kind, processor, processor.crop_size["height"]
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.device, self.batch_size = device, batch_size

    def to(self, device: str) -> "Embedder":
        self.model, self.device = self.model.to(device), device
        return self

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 3, size, size] as the model is fed. RGB first: transparency is dropped, as the
        training pictures' and test images' never is (they come in RGB)."""
        return self.processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.pixels(images[start:start + self.batch_size]).to(self.device)
            if self.kind == "clip":
                features = _pooled(self.model.get_image_features(pixel_values=pixels))
            else:  # DINO: the CLS token of the last layer, as in the DreamBooth paper
                features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            chunks.append(features.float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ScoreError(f"The {self.kind} model has no text tower; CLIP-T needs clip_model.")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        features = _pooled(self.model.get_text_features(input_ids=tokens.input_ids,
                                                        attention_mask=tokens.attention_mask))
        return torch.nn.functional.normalize(features.float().cpu(), dim=-1)


def _load_error(setting: str, name: str, e: Exception) -> ScoreError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ScoreError(f"{setting}: cannot load {name!r} ({first}). It is downloaded from the Hugging Face Hub on "
                      f"first use; without internet, copy the model folder here and set {setting}=/path/to/it.")


def load_clip(name: str, device: str = "cpu") -> Embedder:
    from transformers import CLIPModel, CLIPTokenizer  # lazy: loads transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # lazy: loads transformers

    try:
        model = CLIPModel.from_pretrained(name)
        tokenizer = CLIPTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _load_error("clip_model", name, e) from None
    processor = image_processor(model.config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return Embedder("clip", model, processor, tokenizer, device)


def load_dino(name: str, device: str = "cpu") -> Embedder:
    from transformers import ViTModel  # lazy: loads transformers
    # lazy: loads transformers, yaml, huggingface_hub
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    try:  # the DINO checkpoints carry no pooler; only the CLS token is used
        model = ViTModel.from_pretrained(name, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise _load_error("dino_model", name, e) from None
    processor = image_processor(model.config.image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return Embedder("dino", model, processor, None, device)


# --- the numbers ----------------------------------------------------------------------------------

def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities (rows normalized here, so any embeddings do)."""
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    return (a @ b.T).clamp(-1.0, 1.0)  # rounding can put a self-similarity at 1.0000001


def mean_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """CLIP-I / DINO: the mean over all pairs (generated image, instance image)."""
    return float(cosine(a, b).mean()) if len(a) and len(b) else math.nan


def paired_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: the mean over images of the similarity to their own prompt (row i ↔ text i)."""
    if not len(images):
        return math.nan
    a, b = torch.nn.functional.normalize(images, dim=-1), torch.nn.functional.normalize(texts, dim=-1)
    return float((a * b).sum(-1).clamp(-1.0, 1.0).mean())


def _row_images(samples, row, kind: str, texts: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor]:
    """A row's images of one prompt kind, and the CLIP-T text embedding of each."""
    pairs = images_of(samples, row, kind)
    return [im for _, im in pairs], texts[[p.index for p, _ in pairs]]


def clip_table(samples, instance: list[Image.Image], clip: Embedder, dino: Embedder) -> list[dict]:
    """One dict per row of `samples` (a dbnb.evaluate.sample.SampleResult), with COLUMNS as keys."""
    inst_clip, inst_dino = clip.images(instance), dino.images(instance)
    texts = clip.texts([p.clip_text for p in samples.prompts])
    rows = []
    for row in samples.rows:
        fid, _ = _row_images(samples, row, "fidelity", texts)
        flex, flex_texts = _row_images(samples, row, "flexibility", texts)
        klass, class_texts = _row_images(samples, row, "class", texts)
        class_emb = clip.images(klass) if klass else inst_clip[:0]
        clip_i, dino_i = mean_similarity(clip.images(fid), inst_clip), mean_similarity(dino.images(fid), inst_dino)
        rows.append(row_scores(row, clip_i=clip_i, dino=dino_i, fidelity=(clip_i + dino_i) / 2,
                               clip_t=paired_similarity(clip.images(flex), flex_texts) if flex else math.nan,
                               class_clip_t=paired_similarity(class_emb, class_texts),
                               class_clip_i=mean_similarity(class_emb, inst_clip)))
    for r in rows:  # the base model is rows[0]
        r["drift"] = rows[0]["class_clip_t"] - r["class_clip_t"]
    return rows


class ClipScorer:
    """Both models load when the scorer is made, on the CPU, so one that cannot load (offline, a
    wrong name) stops the run before minutes of test images; they move to `device` only for
    the table, once the test images' pipeline has given its memory back."""
    columns = COLUMNS
    weighed = WEIGHED
    panels = PANELS

    def __init__(self, clip_model: str, dino_model: str, device: str = "cpu"):
        self.clip, self.dino, self.device = load_clip(clip_model), load_dino(dino_model), device

    def table(self, samples, instance: list[Image.Image]) -> list[dict]:
        return clip_table(samples, instance, self.clip.to(self.device), self.dino.to(self.device))
