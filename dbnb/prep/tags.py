"""Tagger tags as caption text (`caption_mode=tags`), and the character's core tags.

- A tag's caption text is its `selected_tags.csv` name with underscores as spaces — except
  tags of up to three characters, the kaomoji (`^_^`), as kohya's tagger script does — and
  `(` `)` escaped as `\\(` `\\)`, because the webui reads bare brackets as attention weights.
- The caption is `instance_token, [class_token,] tags…` with the class word once.
- Core tags: body traits the character always has (hair, eyes, ears, …; CORE_TAGS is the one
  list). Present in at least `core_tag_share` of the pictures, they are left out of the
  captions (`prune_core_tags`), so the trigger word learns them — the usual practice for
  character models. Clothes, poses and places stay: they are what a prompt should change.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# Body traits, as caption text. Whole-tag patterns; NOT_CORE names the look-alikes that are
# expressions or actions ("closed eyes", "hand in own hair").
CORE_TAGS = re.compile(
    r"(.+ hair|.+ eyes|.+ pupils|.+ ears|.+ tail|.+ horns?|.+ skin|.+ bangs|.+ sidelocks?|.+ braids?"
    r"|.+ ponytail|.+ twintails|.+ hair bun|.+ breasts|.+ eyebrows|.+ eyelashes"
    r"|bangs|sidelocks|ahoge|twintails|ponytail|braid|hair bun|double bun|drill hair|twin drills|ringlets"
    r"|hair intakes|heterochromia|freckles|mole|mole under (eye|mouth)|fang|fangs|skin fang|pointy ears"
    r"|animal ears|tail|horns|halo|wings|breasts|flat chest|tan|dark-skinned (female|male))")
NOT_CORE = re.compile(
    r"(closed eyes|half-closed eyes|one eye closed|rolling eyes|covered eyes|covering eyes|wide eyes"
    r"|empty eyes|crazy eyes|glowing eyes|looking at .*|.*own hair|.* in hair|wet hair|floating hair"
    r"|hair blowing|messy hair|hair over .*|grabbing .*|hand on .*|hands on .*|.*holding.*|wagging tail"
    r"|tail raised|.*between breasts|breasts out|.*on breasts)")


def caption_tag(name: str) -> str:
    """`long_hair` → `long hair`, `hanatsuki_(dbnb)` → `hanatsuki \\(dbnb\\)`, `^_^` kept."""
    text = name.replace("_", " ") if len(name) > 3 else name
    return text.replace("(", r"\(").replace(")", r"\)")


def is_core(tag: str, character_tags: frozenset[str] = frozenset()) -> bool:
    """A body trait (caption text), or a character-name tag: both describe the character itself."""
    plain = tag.replace(r"\(", "(").replace(r"\)", ")")
    return tag in character_tags or (CORE_TAGS.fullmatch(plain) is not None and NOT_CORE.fullmatch(plain) is None)


def core_tags(per_picture: list[list[str]], share: float, character_tags: frozenset[str] = frozenset()) -> list[str]:
    """Core tags present in at least `share` of the pictures, most frequent first."""
    if not per_picture:
        return []
    counts = Counter(t for tags in per_picture for t in dict.fromkeys(tags))
    need = share * len(per_picture)
    return [t for t, n in counts.most_common() if n >= need - 1e-9 and is_core(t, character_tags)]


def tag_caption(instance_token: str, class_token: str, tags: list[str]) -> str:
    """`instance_token, [class_token,] tags…`; each word once (the class word is often a
    tag too: class_token=1girl)."""
    out: list[str] = []
    for t in [instance_token, class_token, *tags]:
        t = " ".join(t.split())
        if t and t not in out:
            out.append(t)
    return ", ".join(out)


def frequency(captions: list[str]) -> dict[str, int]:
    """Pictures per caption tag, most frequent first: kohya's `ss_tag_frequency` counts (that
    metadata is {dataset folder name: these})."""
    counts = Counter(t for c in captions for t in {" ".join(p.split()) for p in c.split(",")} if t)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class TagTable:
    """What tagging found over the training pictures, for the captions and the report."""
    pictures: int = 0
    detected: dict[str, int] = field(default_factory=dict)        # caption tag -> pictures (before pruning)
    pruned: list[str] = field(default_factory=list)               # core tags left out of the captions
    captions: dict[str, list[str]] = field(default_factory=dict)  # output file -> its caption tags

    def to_dict(self) -> dict:
        return {"pictures": self.pictures, "detected": self.detected, "pruned": self.pruned}


def tag_outputs(rows, out: Path, tagger, cfg) -> TagTable:
    """Tag every training picture (the prepared PNGs, crops included: what the trainer sees).
    A row keeps its tags with the tagger and thresholds they were made with, so an unchanged
    picture is not tagged again."""
    used_with = f"{getattr(tagger, 'name', type(tagger).__name__)} {cfg.tag_threshold:g} {cfg.character_tag_threshold:g}"
    usable = [row for row in rows if row.usable]
    for row in usable:
        if row.tagger != used_with:
            row.tags, row.tagger = {}, used_with
    todo = [(row, name) for row in usable for name in row.outputs if name not in row.tags]
    for start in range(0, len(todo), 32):  # a few at a time: a big set's pictures never all sit in memory
        part = todo[start:start + 32]
        images = []
        for _, name in part:
            with Image.open(out / name) as im:
                images.append(im.convert("RGBA"))
        for (row, name), tags in zip(part, tagger.detect(images, cfg.tag_threshold, cfg.character_tag_threshold)):
            row.tags[name] = tags
    categories = getattr(tagger, "categories", {})
    character = frozenset(caption_tag(n) for n, c in categories.items() if c == 4)
    table = TagTable(captions={name: [caption_tag(t) for t in row.tags[name]] for row in usable for name in row.outputs})
    per_picture = list(table.captions.values())
    table.pictures = len(per_picture)
    table.detected = dict(Counter(t for tags in per_picture for t in dict.fromkeys(tags)).most_common())
    if cfg.prune_core_tags:
        table.pruned = core_tags(per_picture, cfg.core_tag_share, character)
        table.captions = {n: [t for t in tags if t not in table.pruned] for n, tags in table.captions.items()}
    return table
