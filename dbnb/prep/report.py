"""What prep did: one row per source file, the set's counts, the seed's advice, a contact sheet.

The report is also prep's memory: a re-run reads `prep_report.json` to skip pictures whose
content and settings are unchanged, and to tell its own captions from hand-edited ones.
Nothing in it depends on the clock, so the same input gives the same files.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from dbnb.core.platform import shown
from dbnb.data.buckets import all_square_note, assign_all, counts, file_size, histogram_line
from dbnb.data.pictures import flatten
from dbnb.family.render import make_grid
from dbnb.prep.views import balance_advice, flagged_advice, framing_counts

REPORT_JSON = "prep_report.json"
REPORT_MD = "report.md"
# In a subfolder: the trainer takes every picture directly in instance_data_dir.
CONTACT_SHEET = "prep_preview/contact_sheet.png"
MIN_IMAGES = 3
THUMB = 160
GUIDE_LINES = 10  # the summary names this many guide flags; report.md has them all


@dataclass
class FileResult:
    source: str                                  # name inside the source (folder-relative / URL)
    status: str = "prepared"                     # prepared | unchanged | duplicate | failed | ignored
    size: list[int] | None = None                # width, height as read
    mode: str = ""
    done: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)   # output file name -> framing
    captions: dict[str, str] = field(default_factory=dict)  # output file name -> caption written
    framing: str = ""
    sha256: str = ""
    dhash: str = ""
    key: str = ""                                # settings fingerprint the outputs were made with
    tags: dict[str, dict[str, float]] = field(default_factory=dict)  # output -> tagger tag -> probability
    tagger: str = ""                             # tagger and thresholds the tags were made with
    guide: list[str] = field(default_factory=list)  # the guide's advice on this picture (prep.views)

    @property
    def usable(self) -> bool:
        return self.status in ("prepared", "unchanged")


@dataclass
class PrepReport:
    out_dir: Path
    files: list[FileResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    tags: dict | None = None                     # caption_mode=tags: TagTable.to_dict()
    tag_frequency: dict[str, int] = field(default_factory=dict)  # caption tag -> pictures (ss_tag_frequency)
    detector: str = ""                           # the face detector's name; "" when none is installed
    balance: str = ""                            # full body : bust-up against the guide's 3 : 2 (prep.views)
    buckets: str = ""                            # with bucketing: the pictures per bucket (bucket_line)

    @property
    def images(self) -> list[Path]:
        return [self.out_dir / name for f in self.files if f.usable for name in f.outputs]

    @property
    def contact_sheet(self) -> Path:
        return self.out_dir / CONTACT_SHEET

    @property
    def failed(self) -> list[FileResult]:
        return [f for f in self.files if f.status == "failed"]

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "counts": self.counts, "warnings": self.warnings,
                "tags": self.tags, "tag_frequency": self.tag_frequency, "detector": self.detector,
                "balance": self.balance, "buckets": self.buckets, "files": [asdict(f) for f in self.files]}

    def summary(self) -> str:
        by = Counter(f.status for f in self.files)
        lines = [f"dbnb prep: {len(self.images)} training pictures in {shown(self.out_dir)} "
                 f"({', '.join(f'{n} {s}' for s, n in sorted(by.items()))}).", self.framing_line()]
        lines += [f"balance: {self.balance}"] if self.balance else []
        lines += [self.buckets] if self.buckets else []
        lines += [f"  ! {f.source}: {f.status}: {'; '.join(f.warnings)}" for f in self.files
                  if f.status in ("failed", "duplicate")]
        guided = [f"  guide: {f.source}: {g}" for f in self.files if f.usable for g in f.guide]
        lines += guided[:GUIDE_LINES] + ([f"  … {len(guided) - GUIDE_LINES} more in report.md"]
                                          if len(guided) > GUIDE_LINES else [])
        if self.tags:
            pruned = self.tags["pruned"]
            lines.append(f"tags: {len(self.tags['detected'])} distinct over {self.tags['pictures']} pictures"
                         + (f"; core tags left for the trigger word to learn: {', '.join(pruned)}" if pruned else ""))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def framing_line(self) -> str:
        return framing_line(self.counts, self.detector)

    def markdown(self) -> str:
        rows = ["| source file | size | status | what was done | outputs | warnings |",
                "|---|---|---|---|---|---|"]
        for f in self.files:
            size = f"{f.size[0]}x{f.size[1]}" if f.size else ""
            cells = [f.source, size, f.status, "; ".join(f.done), ", ".join(f.outputs), "; ".join(f.warnings)]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        advice = [f"- {w}" for w in self.warnings] or ["- none"]
        balance = [f"Balance: {self.balance}", ""] if self.balance else []
        balance += [self.buckets, ""] if self.buckets else []
        return "\n".join([f"# dbnb prep report: {self.out_dir.name}", "", self.framing_line().capitalize(), "",
                          *balance, f"Contact sheet: {CONTACT_SHEET}", "",
                          "## Warnings", *advice, "", *self._guide_list(), *self._tag_table(), "## Files", *rows, ""])

    def _guide_list(self) -> list[str]:
        """Each picture the guide advises against, with its reason (English / Japanese)."""
        lines = [f"- {f.source}: {g}" for f in self.files if f.usable for g in f.guide]
        if not lines:
            return []
        return ["## The guide on these pictures / ガイドから見た画像", "",
                "The guide's advice on which pictures to use (選んではいけない画像). / "
                "ガイドの「選んではいけない画像」に当たるものです。", "", *lines, ""]

    def _tag_table(self) -> list[str]:
        """Every detected tag, how many pictures have it and whether the captions keep it."""
        if not self.tags:
            return []
        n, pruned = self.tags["pictures"] or 1, set(self.tags["pruned"])
        rows = ["## Tags", "", f"{len(self.tags['detected'])} tags over {self.tags['pictures']} training pictures. "
                "Core tags (body traits shared by most pictures) are left out of the captions so the trigger word "
                "learns them.", "", "| tag | pictures | share | in captions |", "|---|---|---|---|"]
        for tag, count in self.tags["detected"].items():
            kept = "no (core tag)" if tag in pruned else "yes"
            rows.append(f"| {tag.replace('|', chr(92) + '|')} | {count} | {count / n:.0%} | {kept} |")
        return rows + [""]

    def write(self) -> None:
        (self.out_dir / REPORT_JSON).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
        (self.out_dir / REPORT_MD).write_text(self.markdown(), encoding="utf-8")


def read_previous(out_dir: Path) -> dict[str, FileResult]:
    """The last run's rows by source name; an unreadable report just means no shortcuts."""
    try:
        data = json.loads((out_dir / REPORT_JSON).read_text(encoding="utf-8"))
        return {r["source"]: FileResult(**r) for r in data["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def framing_line(counts: dict[str, int], detector: str | None = None) -> str:
    """The framing counts as a user reads them. "unknown" means no face was found: by `detector`
    (its name), or because none is installed (""); None is a report from before dbnb said which."""
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "unknown")
    line = "framings (from the face's size): " + (shown or "none told")
    unknown = counts.get("unknown")
    if unknown and detector:
        line += f"; {detector} found no face in {unknown} picture(s), so their framing is not told"
    elif unknown and detector == "":
        line += (f"; framing not told for {unknown} picture(s): no face detector is installed "
                 "(`pip install animeface` reads anime faces)")
    elif unknown:
        line += (f"; {unknown} picture(s) with no face found, framing not told (no face detector "
                 "installed, or none found: `pip install animeface` reads anime faces)")
    return line


def count_framings(files: list[FileResult]) -> dict[str, int]:
    """Training pictures per framing; bust-up and cowboy crops count as bust."""
    counts = Counter({"face": 0, "bust": 0, "full body": 0, "unknown": 0})
    for f in files:
        if f.usable:
            counts.update("bust" if v == "cowboy" else v for v in f.outputs.values())
    return dict(counts)


def advice(files: list[FileResult], resolution: int) -> list[str]:
    """The seed's advice on the set as a whole; the pictures it advises against (their `guide`
    flags, set by prep.views.flag_pictures) and the framing balance."""
    out = []
    usable = [f for f in files if f.usable]
    if len(usable) < MIN_IMAGES:
        out.append(f"only {len(usable)} usable picture(s): the seed needs at least {MIN_IMAGES} "
                   "(more, from several angles, for detailed outfits)")
    out += flagged_advice(files) + balance_advice(framing_counts(files), MIN_IMAGES)
    dups = [f for f in files if f.status == "duplicate"]
    near = [f for f in usable if any(w.startswith("near duplicate") for w in f.warnings)]
    if dups or near:
        out.append(f"{len(dups)} exact and {len(near)} near duplicate(s): a repeated picture is learnt twice as "
                   "hard; keep one of each (see the table)")
    low = [f for f in usable if any(w.startswith("low resolution") for w in f.warnings)]
    if low:
        out.append(f"{len(low)} picture(s) smaller than {resolution}px were upscaled and may look blurry: "
                   + ", ".join(f.source for f in low[:5]) + (" …" if len(low) > 5 else ""))
    failed = [f for f in files if f.status == "failed"]
    if failed:
        out.append(f"{len(failed)} file(s) could not be used: " + ", ".join(f.source for f in failed[:5])
                   + (" …" if len(failed) > 5 else "") + " (reasons in the table)")
    return out


def bucket_line(images: list[Path], config) -> str:
    """With bucketing: how many of the prepared pictures train at each bucket (width x height);
    "" without it."""
    if not config.bucketing or not images:
        return ""
    tally = counts(assign_all([file_size(p) for p in images], config))
    return f"buckets (bucketing=true, width x height): {histogram_line(tally)}{all_square_note(tally, config)}"


def contact_sheet(paths: list[Path], target: Path, thumb: int = THUMB) -> Path | None:
    """Every prepared picture as a labelled thumbnail in one PNG, to check the set at a glance."""
    if not paths:
        target.unlink(missing_ok=True)
        return None
    thumbs, names = [], []
    for p in paths:  # thumbnails one by one: a large set's full-size pictures never sit in memory together
        with Image.open(p) as im:
            # padded, not squeezed: a picture prep left unsquared (square_mode=keep) shows its shape
            thumbs.append(ImageOps.pad(flatten(im, "white"), (thumb - 4, thumb - 4), Image.Resampling.BILINEAR,
                                       color="white"))
        # ASCII: Pillow's built-in font has no Japanese glyphs; the hash suffix identifies the file.
        name = p.stem.encode("ascii", "replace").decode()
        names.append(name if len(name) <= 24 else name[:11] + "~" + name[-11:])
    sheet = make_grid(thumbs, min(8, math.ceil(math.sqrt(len(paths)))), names, size=(thumb, thumb),
                      background=(236, 236, 236), labels_below=True, pad=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target, "PNG")
    return target
