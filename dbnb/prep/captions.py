"""Captions: one `.txt` beside each prepared picture, read by the trainer's [filewords]
(`dbnb.data.dataset.caption_for`). Made from `caption_template` (or the tagger's tags with
caption_mode=tags), with the tags of a `.txt` that came with the original, and never over a
caption someone has edited by hand since prep wrote it.
"""
from __future__ import annotations

import re
from pathlib import Path

from dbnb.prep.framing import FRAMING_TAGS
from dbnb.prep.tags import tag_caption

PLACEHOLDERS = ("[instance_token]", "[class_token]", "[framing]")


def sidecar(image: Path) -> str:
    """Tags shipped with the original (`a.png` + `a.txt`), e.g. from a tagger; "" if none."""
    txt = Path(image).with_suffix(".txt")
    try:
        return " ".join(txt.read_text(encoding="utf-8-sig").split()) if txt.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return ""


def caption(template: str, instance_token: str, class_token: str, framing: str = "", tags: str = "") -> str:
    """The template filled in: [instance_token], [class_token], [framing] ("upper body",
    "full body", … from the detected framing; empty when unknown). Tags from the original's
    own .txt follow, unless they already name the character (then they are the whole caption)."""
    if tags and instance_token and re.search(rf"\b{re.escape(instance_token)}\b", tags):
        return tags
    text = (template.replace("[instance_token]", instance_token).replace("[class_token]", class_token)
            .replace("[framing]", FRAMING_TAGS.get(framing, "")))
    if tags:
        text = f"{text}, {tags}"
    parts = [" ".join(p.split()) for p in text.split(",")]
    return ", ".join(p for p in parts if p)


def from_tags(instance_token: str, class_token: str, tags: list[str], sidecar_tags: str = "") -> str:
    """caption_mode=tags: `instance_token, [class_token,] tagger tags…, tags of the original's
    .txt`; a .txt that already names the character is kept as the whole caption."""
    if sidecar_tags and instance_token and re.search(rf"\b{re.escape(instance_token)}\b", sidecar_tags):
        return sidecar_tags
    return tag_caption(instance_token, class_token, tags + [t.strip() for t in sidecar_tags.split(",")])


def write_all(rows, sidecars: dict[str, str], previous: dict, out: Path, cfg, tagged=None) -> list[str]:
    """Write every usable row's captions (from `tagged`, a TagTable, with caption_mode=tags);
    returns set-level warnings."""
    notes, kept = [], []
    for row in rows:
        if not row.usable:
            continue
        old = previous.get(row.source)
        for name, framing in row.outputs.items():
            txt = (out / name).with_suffix(".txt")
            if tagged is not None:
                text = from_tags(cfg.instance_token, cfg.class_token, tagged.captions[name],
                                 sidecars.get(row.source, ""))
            else:
                text = caption(cfg.caption_template, cfg.instance_token, cfg.class_token, framing,
                               sidecars.get(row.source, ""))
            written = old.captions.get(name) if old else None
            if written is not None and txt.is_file() and _read(txt) != written:
                row.captions[name] = written  # remember prep's own text, so the edit stays detectable
                kept.append(name)
                continue
            txt.write_text(text + "\n", encoding="utf-8")
            row.captions[name] = text
    if kept:
        notes.append(f"{len(kept)} caption(s) edited by hand were kept (delete the .txt to regenerate): "
                     + ", ".join(kept[:5]) + (" …" if len(kept) > 5 else ""))
    if ("[instance_token]" in cfg.caption_template or tagged is not None) and not cfg.instance_token:
        notes.append("instance_token is empty, so the captions do not name the character: set instance_token "
                     "(a rare word, e.g. 'nanU') and run prep again")
    return notes


def _read(txt: Path) -> str:
    return " ".join(txt.read_text(encoding="utf-8").split())


def edit_tag_everywhere(folder: Path, tag: str, add: bool, suffixes: tuple[str, ...] = (".png",)) -> int:
    """Remove `tag` from every caption in `folder`, or add it after the first tag (the trigger)
    where it is missing; returns how many captions changed. Used by the caption editor."""
    tag, changed = " ".join(tag.split()).strip(", "), 0
    if not tag:
        return 0
    for image in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes):
        txt = image.with_suffix(".txt")
        tags = [t for t in (" ".join(x.split()) for x in (_read(txt) if txt.is_file() else "").split(",")) if t]
        if add and tag not in tags:
            tags.insert(min(1, len(tags)), tag)
        elif not add and tag in tags:
            tags = [t for t in tags if t != tag]
        else:
            continue
        txt.write_text(", ".join(tags) + "\n", encoding="utf-8")
        changed += 1
    return changed
