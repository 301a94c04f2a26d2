"""`dbnb prep SRC OUT`: originals in, a training folder out (PNGs + captions + report).

Per picture: decode and normalise → cut out (anime-segmentation, or the picture's own
transparency) onto the background colour → find the face → square and resize (square_mode=keep:
resize to the picture's aspect bucket) → optional bust-up / cowboy crops → caption. The
originals are only ever read. Outputs are named `<name>-<content hash>.png`, so a re-run skips
pictures whose content and settings have not changed and writes byte-identical files when it
does work.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image

from dbnb.core.config import Config
from dbnb.core.errors import DbnbError
from dbnb.core.platform import shown
from dbnb.core.progress import bar as tqdm
from dbnb.data.dataset import caption_for
from dbnb.data.intake import IMAGE_SUFFIXES, FetchError, fetch_images, iter_files, keep_kind
from dbnb.data.pictures import BadImage, dhash, file_sha256, flatten, hamming, load_image
from dbnb.prep import captions
from dbnb.prep.framing import (FRAMING_TAGS, animeface_detector, framing_crops, framing_of, keep_shape, main_face,
                               make_square, subject_box)
from dbnb.prep.report import (CONTACT_SHEET, FileResult, PrepReport, advice, bucket_line, contact_sheet, count_framings,
                              read_previous)
from dbnb.prep.segment import SegmenterError, composite, load_segmenter
from dbnb.prep.tagger import load_tagger
from dbnb.prep.tags import frequency, tag_outputs
from dbnb.prep.views import balance_line, flag_pictures, framing_counts

PREP_VERSION = 2      # bump when the processing changes, so old outputs are redone (2: bottom-anchored padding)
NEAR_DUPLICATE = 5    # dHash bits; resized / re-encoded copies differ by 0-3
WORK_SIDE = 4         # pictures are first shrunk to at most this many x resolution on the long side
AUTO = "auto"


class PrepError(DbnbError, ValueError):
    """prep cannot start; the message names the setting or path and what to do."""


def prepare_dataset(config=None, src: str | Path | None = None, out: str | Path | None = None,
                    progress: bool = True, *, segmenter=None, face_detector=AUTO, tagger=None,
                    **settings) -> PrepReport:
    """Prepare `src` (default config.dataset_source) into `out` (default config.instance_data_dir).

    `config` is a dbnb Config (default: the defaults); `settings` are Config field names that
    override it (`remove_background=False`, `resolution=768`, …). `segmenter` is any callable
    rgb -> "L" mask (default: loaded from `segmentation_model`); `face_detector` any callable
    rgb -> [(x, y, w, h)] (default: animeface when installed, None for no face detection);
    `tagger` a `dbnb.prep.tagger.Tagger` (default: loaded from `tagger_model` when
    caption_mode=tags). Models are loaded before the first picture, so a missing one stops
    prep before it has done anything."""
    cfg = _config(config, settings)
    src, out = _paths(cfg, src, out)
    detector = animeface_detector() if isinstance(face_detector, str) and face_detector == AUTO else face_detector
    job = _Job(cfg, out, read_previous(out), segmenter, detector)
    with tempfile.TemporaryDirectory(prefix="dbnb-prep-") as staging:
        sources, ignored = gather(src, out, Path(staging))
        if cfg.remove_background and job.segmenter is None:
            job.segmenter = load_segmenter(cfg.segmentation_model)
        if cfg.caption_mode == "tags" and tagger is None:
            tagger = load_tagger(cfg.tagger_model)
        out.mkdir(parents=True, exist_ok=True)  # only now: a wrong SRC leaves no empty folder behind

        rows = [job.run(name, path) for name, path in tqdm(sources, desc="prep", unit="img", disable=not progress)]
        sidecars = {name: captions.sidecar(path) for name, path in sources}
    rows = sorted(rows + ignored, key=lambda r: r.source)
    _mark_near_duplicates(rows)
    tagged = tag_outputs(rows, out, tagger, cfg) if cfg.caption_mode == "tags" else None
    set_warnings = job.notes + captions.write_all(rows, sidecars, job.previous, out, cfg, tagged)
    _remove_stale(job.previous, rows, out)
    set_warnings += _strangers(rows, out)
    counts = count_framings(rows)
    flag_pictures(rows, detector=job.detector is not None)
    report = PrepReport(out, rows, set_warnings + advice(rows, cfg.resolution), counts,
                        tagged.to_dict() if tagged else None, caption_frequency(rows, out), job.detector_name,
                        balance_line(framing_counts(rows)))
    report.buckets = bucket_line(report.images, cfg)
    contact_sheet(report.images, out / CONTACT_SHEET)
    report.write()
    if progress:
        print(report.summary(), flush=True)
    return report


def _config(config, settings: dict):
    cfg = config if config is not None else Config()
    return cfg.replace(**settings) if settings else cfg


def _paths(cfg, src, out) -> tuple[str, Path]:
    src = str(src if src is not None else cfg.dataset_source).strip()
    out = str(out if out is not None else cfg.instance_data_dir).strip()
    if not src:
        raise PrepError("No source pictures: set dataset_source (a folder, .zip, Google Drive link or .txt of "
                        "URLs) or give SRC to `dbnb prep SRC OUT`.")
    if not out:
        raise PrepError("No output folder: set instance_data_dir (where the prepared set goes) or give OUT.")
    if Path(src).expanduser().resolve() == Path(out).expanduser().resolve():
        raise PrepError(f"The source and the output are the same folder ({src}): prep never writes over the "
                        "originals. Pick another instance_data_dir, e.g. a 'prepared' folder.")
    return src, Path(out).expanduser()


def gather(src: str, out: Path, staging: Path) -> tuple[list[tuple[str, Path]], list[FileResult]]:
    """(name, path) of every picture in the source, and a row for every other file. A local
    folder is read in place (no copy); anything else is fetched into `staging`."""
    ignored: list[FileResult] = []

    def skip(name: str, reason: str) -> None:
        ignored.append(FileResult(name, status="ignored", warnings=[reason]))

    folder = Path(src).expanduser()
    try:
        if folder.is_dir():
            files = list(iter_files(folder, exclude=out))
            names = {f.relative_to(folder).as_posix() for f in files}
            pictures = [(f.relative_to(folder).as_posix(), f) for f in files
                        if keep_kind(f.relative_to(folder).as_posix(), names, skip) == "image"]
        else:
            pictures = [(p.relative_to(staging).as_posix(), p) for p in fetch_images(src, staging, on_skip=skip)]
    except FetchError as e:
        raise PrepError(str(e)) from None
    if not pictures:
        raise PrepError(f"{shown(src)}: no pictures found (looked for .png, .jpg, .webp, .gif, .bmp, .tif). Put the "
                        "character's pictures there (notebook 02: drop them on the upload box, then run from "
                        "'Prepare' on) or set dataset_source to a folder, .zip or link that holds them.")
    return sorted(pictures), ignored


class _Job:
    """What one run shares between pictures: settings, lazily loaded models, seen hashes."""

    def __init__(self, cfg, out: Path, previous: dict[str, FileResult], segmenter, detector):
        self.cfg, self.out, self.previous = cfg, out, previous
        self.segmenter, self.detector = segmenter, detector
        self.seen: dict[str, str] = {}
        self.notes: list[str] = []
        if detector is None and (cfg.square_mode == "face" or cfg.extra_framings):
            self.notes.append("no face detector (pip install animeface): square_mode=face pads instead and "
                              "no bust-up / cowboy crops are made")
        seg_id = "" if not cfg.remove_background else \
            getattr(segmenter, "name", type(segmenter).__name__) if segmenter else cfg.segmentation_model
        det_id = self.detector_name = getattr(detector, "name", type(detector).__name__) if detector else ""
        fields = dict(v=PREP_VERSION, resolution=cfg.resolution, background=cfg.background_color,
                      remove_background=cfg.remove_background, segmenter=seg_id, square_mode=cfg.square_mode,
                      extra_framings=cfg.extra_framings, detector=det_id)
        if cfg.keep_alpha:  # only when on, so the outputs of earlier runs keep their key
            fields["keep_alpha"] = True
        if cfg.square_mode == "keep":  # the bucket settings size what keep writes
            fields["buckets"] = [cfg.bucket_min_side, cfg.bucket_max_side, cfg.bucket_upscale_limit]
        self.key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def run(self, name: str, path: Path) -> FileResult:
        """One picture; any failure is this picture's row, never the end of the run."""
        try:
            sha = file_sha256(path)
        except OSError as e:
            return FileResult(name, status="failed", warnings=[f"cannot be read ({e})"])
        if sha in self.seen:
            return FileResult(name, status="duplicate", sha256=sha,
                              warnings=[f"exact duplicate of {self.seen[sha]}: left out"])
        self.seen[sha] = name
        old = self.previous.get(name)
        if old and old.usable and (old.sha256, old.key) == (sha, self.key) \
                and all((self.out / n).is_file() for n in old.outputs):
            return dataclasses.replace(old, status="unchanged", captions={},
                                       warnings=[w for w in old.warnings if not w.startswith("near duplicate")])
        try:
            return self.process(name, path, sha)
        except SegmenterError:
            raise  # the model, not this picture: every other picture would fail the same way
        except BadImage as e:
            return FileResult(name, status="failed", sha256=sha, warnings=[str(e)])
        except Exception as e:  # noqa: BLE001 — the promise: a bad file never stops the run
            return FileResult(name, status="failed", sha256=sha,
                              warnings=[f"could not be processed ({type(e).__name__}: {e})"])

    def process(self, name: str, path: Path, sha: str) -> FileResult:
        cfg = self.cfg
        loaded = load_image(path)
        row = FileResult(name, size=list(loaded.size), mode=loaded.mode, done=loaded.done,
                         warnings=loaded.warnings, sha256=sha, key=self.key)
        rgba = self._shrink(loaded.image, row)
        row.dhash = f"{dhash(flatten(rgba, cfg.background_color)):016x}"
        rgb, mask = self._cut_out(rgba, loaded.has_alpha, row)
        face = main_face(self.detector, rgb) if self.detector else None
        subject = subject_box(mask, rgb.size)
        row.framing = framing_of(face, subject)
        if cfg.keep_alpha and mask is not None:  # the cut-out's alpha travels with every square and crop
            rgb = rgb.copy()
            rgb.putalpha(mask)
            row.done.append("alpha kept")
        if cfg.square_mode == "keep":
            square, done, warns = keep_shape(rgb, cfg)
        else:
            square, done, warns = make_square(rgb, cfg.square_mode, cfg.resolution, cfg.background_color, face,
                                              mask)
        row.done += done
        row.warnings += warns
        stem = f"{_slug(Path(name).stem)}-{sha[:8]}"
        row.outputs[_save(square, self.out / f"{stem}.png")] = row.framing
        if cfg.extra_framings and row.framing == "full body":
            for kind, (crop, crop_warns) in framing_crops(rgb, face, subject, cfg.resolution,
                                                          cfg.background_color).items():
                row.outputs[_save(crop, self.out / f"{stem}-{kind}.png")] = kind
                row.done.append(f"{FRAMING_TAGS[kind]} crop")
                row.warnings += crop_warns
        return row

    def _shrink(self, rgba: Image.Image, row: FileResult) -> Image.Image:
        """A 6000 px scan gains nothing over 4x the training size and costs seconds per step."""
        limit = WORK_SIDE * self.cfg.resolution
        if max(rgba.size) <= limit:
            return rgba
        scale = limit / max(rgba.size)
        row.done.append(f"shrunk to {limit}px for processing")
        return rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))),
                           Image.Resampling.LANCZOS, reducing_gap=3.0)

    def _cut_out(self, rgba: Image.Image, has_alpha: bool, row: FileResult):
        """(rgb on the background colour, the character's mask or None)."""
        bg = self.cfg.background_color
        if has_alpha:
            # Already cut out (a transparent PNG): its alpha is a better mask than a model's guess.
            row.done.append(f"transparency put on {bg}" + (" (segmentation skipped)" if self.cfg.remove_background
                                                            else ""))
            return flatten(rgba, bg), rgba.getchannel("A")
        rgb = rgba.convert("RGB")
        if not self.cfg.remove_background:
            return rgb, None
        mask = self.segmenter(rgb)
        row.done.append(f"background removed, put on {bg}")
        return composite(rgb, mask, bg), mask


def caption_frequency(rows: list[FileResult], out: Path) -> dict[str, int]:
    """Tag counts of the captions as the trainer will read them (hand edits included)."""
    return frequency([caption_for(out / name) for r in rows if r.usable for name in r.outputs])


def _slug(stem: str) -> str:
    """File-system-safe, readable name (Japanese letters kept: they are fine in file names)."""
    return re.sub(r"[^\w.-]+", "_", stem).strip("._")[:60] or "image"


def _save(image: Image.Image, target: Path) -> str:
    """Written under a temporary name, then renamed: a killed session leaves no half PNG that a
    re-run would take as done."""
    tmp = target.with_name(target.name + ".part")
    image.save(tmp, "PNG")
    os.replace(tmp, target)
    return target.name


def _mark_near_duplicates(rows: list[FileResult]) -> None:
    usable = [r for r in rows if r.usable and r.dhash]
    for i, a in enumerate(usable):
        for b in usable[i + 1:]:
            d = hamming(int(a.dhash, 16), int(b.dhash, 16))
            if d <= NEAR_DUPLICATE:
                a.warnings.append(f"near duplicate of {b.source} (hash distance {d})")
                b.warnings.append(f"near duplicate of {a.source} (hash distance {d})")


def _strangers(rows: list[FileResult], out: Path) -> list[str]:
    """Pictures in OUT that prep did not write: the trainer takes every picture there."""
    ours = {n for r in rows for n in r.outputs}
    others = sorted(p.name for p in out.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in ours)
    if not others:
        return []
    return [f"{out} also holds {len(others)} picture(s) prep did not write, and the trainer will use them: "
            + ", ".join(others[:5]) + (" …" if len(others) > 5 else "") + ". Move them out if they are not wanted."]


def _remove_stale(previous: dict[str, FileResult], rows: list[FileResult], out: Path) -> None:
    """Outputs an earlier run wrote that this run did not (source removed or changed): the
    trainer would otherwise keep learning them. Only files prep itself wrote are touched."""
    current = {n for r in rows for n in r.outputs}
    for old in previous.values():
        for name in old.outputs:
            if name not in current:
                (out / name).unlink(missing_ok=True)
                txt = (out / name).with_suffix(".txt")
                if txt.is_file() and txt.read_text(encoding="utf-8").strip() == old.captions.get(name, "").strip():
                    txt.unlink()
