"""Bring pictures into a folder: from a local folder, a .zip, a Google Drive link, an http(s)
URL or a .txt list of URLs. Originals are never touched; archives are checked before a
single byte is written, because a shared .zip is exactly where `../` entries, absolute
paths, symlinks and zip bombs come from.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.parse
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

# FetchError is re-exported: callers catch it from here, the downloads raise the same class.
from dbnb.core.download import CHUNK, FetchError, download, fetch_drive, is_drive, is_url

# What counts as a picture everywhere (import, prep, the trainer's folders): what PIL reads and
# dbnb.data.pictures.load_image decodes (a GIF's first frame, 16-bit TIFF).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# on_skip(name, reason): told about every file that was left out, so a report can list it.
SkipHook = Callable[[str, str], None]


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _is_junk(name: str) -> bool:
    """macOS / Windows litter: `._x.png` is an AppleDouble file, not a picture."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return any(p == "__MACOSX" for p in parts) or (bool(parts) and parts[-1].startswith((".", "~$"))) \
        or (bool(parts) and parts[-1].lower() in ("thumbs.db", "desktop.ini"))


def fetch_images(source: str | Path, dest: Path, *, max_bytes: int = 2 * 2**30,
                 on_skip: SkipHook | None = None) -> list[Path]:
    """Copy / extract / download the pictures of `source` into `dest` and return them (by
    suffix; not yet decoded). Folder structure is kept under `dest`. `max_bytes` bounds what
    one archive may expand to and what one download may be. `.txt` captions lying beside a
    picture come along (not returned). Other files are left out and reported to `on_skip`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    skip = on_skip or _warn_skip
    text = str(source).strip()
    if not text:
        raise FetchError("No image source given: set dataset_source to a folder, .zip, Google Drive link, "
                         "URL or .txt list of URLs.")
    if is_url(text):
        return _fetch_url(text, dest, max_bytes, skip)
    path = Path(text).expanduser()
    if path.is_dir():
        return copy_folder(path, dest, skip)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (read from the folder dbnb runs in: {path.absolute()})"
        raise FetchError(f"Image source {text!r} does not exist{where}. Give a folder, a .zip, a Google Drive link, "
                         "an http(s) URL or a .txt list of URLs (on Colab: is Drive mounted?).")
    return _place(path, dest, max_bytes, skip)


def _warn_skip(name: str, reason: str) -> None:
    warnings.warn(f"{name}: left out ({reason}).", stacklevel=3)


def _place(path: Path, dest: Path, max_bytes: int, skip: SkipHook) -> list[Path]:
    """One local file: a zip is extracted, a URL list downloaded, a picture copied."""
    if zipfile.is_zipfile(path):
        return extract_zip(path, dest, max_bytes=max_bytes, on_skip=skip)
    if path.suffix.lower() == ".zip":
        raise FetchError(f"{path}: named .zip but not a complete .zip archive (a download or copy that stopped "
                         "part-way?). Download or create the archive again.")
    if path.suffix.lower() == ".txt":
        return _fetch_url_list(path, dest, max_bytes, skip)
    if is_image_name(path.name):
        target = free_name(dest / path.name)
        shutil.copyfile(path, target)
        return [target]
    raise FetchError(f"{path}: not a picture, .zip or .txt URL list (suffix {path.suffix or 'none'!r}). "
                     f"Pictures must end in {', '.join(IMAGE_SUFFIXES)}.")


# --- local folders -----------------------------------------------------------------------

def iter_files(folder: Path, exclude: Path | None = None) -> Iterator[Path]:
    """Every file under `folder`, sorted, skipping `exclude` (an output folder inside the
    source) and directory symlinks (a link loop would never end)."""
    skip_dir = exclude.resolve() if exclude else None
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip_dir is None or Path(root, d).resolve() != skip_dir))
        for name in sorted(files):
            yield Path(root, name)


def copy_folder(folder: Path, dest: Path, skip: SkipHook | None = None) -> list[Path]:
    skip = skip or _warn_skip
    folder = Path(folder)
    if Path(dest).resolve() == folder.resolve():
        raise FetchError(f"{folder}: the source and the destination are the same folder; pick another "
                         "destination so the originals stay untouched.")
    dest_inside = Path(dest).resolve().is_relative_to(folder.resolve())
    placed = []
    files = list(iter_files(folder, exclude=Path(dest) if dest_inside else None))
    names = {f.relative_to(folder).as_posix() for f in files}
    for f in files:
        rel = f.relative_to(folder).as_posix()
        keep = keep_kind(rel, names, skip)
        if keep:
            target = Path(dest, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)  # contents only: no permissions or times to trip over
            if keep == "image":
                placed.append(target)
    return placed


def keep_kind(rel: str, names: set[str], skip: SkipHook) -> str:
    """"image", "caption" (a .txt beside a picture) or "" (left out, reported unless junk)."""
    if _is_junk(rel):
        return ""
    if is_image_name(rel):
        return "image"
    stem = rel.rsplit(".", 1)[0]
    if rel.lower().endswith(".txt") and any(f"{stem}{s}" in names for s in _suffix_variants()):
        return "caption"
    skip(rel, f"not a picture ({', '.join(IMAGE_SUFFIXES)})")
    return ""


def _suffix_variants() -> list[str]:
    return [s for suf in IMAGE_SUFFIXES for s in (suf, suf.upper())]


# --- zip archives --------------------------------------------------------------------------

def extract_zip(archive: Path, dest: Path, *, max_bytes: int = 2 * 2**30,
                on_skip: SkipHook | None = None) -> list[Path]:
    """Extract the pictures (and their .txt captions) of `archive` into `dest`. Every entry
    is checked first; one unsafe entry refuses the whole archive, so nothing is half-written."""
    skip = on_skip or _warn_skip
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{archive}: not a readable .zip ({e}). Re-create the archive.") from None
    with zf:
        entries = [(info, _entry_name(info)) for info in zf.infolist() if not info.is_dir()]
        _check_entries(archive, entries, max_bytes)
        names = {name for _, name in entries}
        placed, budget = [], max_bytes
        for info, name in entries:
            keep = keep_kind(name, names, skip)
            if keep:
                target = dest.joinpath(*PurePosixPath(name).parts)
                budget -= _copy_entry(zf, info, target, budget, archive, name)
                if keep == "image":
                    placed.append(target)
    return placed


def _entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as the archiver meant it. Zips made on Japanese Windows store names
    in cp932 without the UTF-8 flag; zipfile then reads them as cp437 mojibake."""
    name = info.filename
    if not info.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("cp932")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return name.replace("\\", "/")


def _check_entries(archive: Path, entries: list, max_bytes: int) -> None:
    bad = []
    for info, name in entries:
        p = PurePosixPath(name)
        if p.is_absolute() or (p.parts and ":" in p.parts[0]):
            bad.append(f"{name!r} is an absolute path")
        elif ".." in p.parts:
            bad.append(f"{name!r} points outside the archive's folder (..)")
        elif stat.S_ISLNK(info.external_attr >> 16):
            bad.append(f"{name!r} is a symbolic link")
    if bad:
        raise FetchError(f"{archive}: refusing to extract this archive, it has unsafe entries: "
                         + "; ".join(bad) + ". Re-create the .zip from the picture folder itself.")
    total = sum(info.file_size for info, _ in entries)
    if total > max_bytes:
        raise FetchError(f"{archive}: refusing to extract, it would expand to {total:,} bytes, more than the "
                         f"limit of {max_bytes:,} (a damaged archive or a zip bomb?). If it is genuine, "
                         "split it or pass a larger max_bytes.")


def _copy_entry(zf: zipfile.ZipFile, info, target: Path, budget: int, archive: Path, name: str) -> int:
    """Stream one entry, counting real bytes: the sizes in the directory can lie."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > budget:
                    raise FetchError(f"{archive}: entry {name!r} expands past the size limit; refusing the "
                                     "rest of the archive (a zip bomb?).")
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as e:
        target.unlink(missing_ok=True)
        raise FetchError(f"{archive}: entry {name!r} cannot be read ({e}). Re-create the archive "
                         "(encrypted zips are not supported).") from None
    except FetchError:
        target.unlink(missing_ok=True)
        raise
    return written


# --- downloads (dbnb.core.download fetches them; here the pictures are picked out) --------------

def _fetch_url(url: str, dest: Path, max_bytes: int, skip: SkipHook) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="dbnb-fetch-") as tmp:
        got = fetch_drive(url, Path(tmp)) if is_drive(url) else _download(url, Path(tmp), max_bytes)
        if got.is_dir():  # a Drive folder: its pictures (with captions) and archives
            files = list(iter_files(got))
            names = {f.relative_to(got).as_posix() for f in files}
            placed = []
            for f in files:
                rel = f.relative_to(got).as_posix()
                if f.suffix.lower() == ".zip":
                    placed += _place(f, dest, max_bytes, skip)
                elif keep := keep_kind(rel, names, skip):
                    target = Path(dest, rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)
                    if keep == "image":
                        placed.append(target)
            return placed
        if not (zipfile.is_zipfile(got) or is_image_name(got.name)):
            raise FetchError(f"{url}: the download ({got.name}) is neither a picture nor a .zip. "
                             "Link the picture or archive itself, not a web page.")
        return _place(got, dest, max_bytes, skip)


def _download(url: str, tmp: Path, max_bytes: int) -> Path:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    target = free_name(tmp / name)
    kind = download(url, target, max_bytes=max_bytes)
    if not is_image_name(target.name) and kind.startswith("image/"):
        target = target.rename(target.with_name(target.name + "." + kind.split("/")[1].replace("jpeg", "jpg")))
    return target


def _fetch_url_list(listing: Path, dest: Path, max_bytes: int, skip: SkipHook) -> list[Path]:
    """One URL per line (blank lines and # comments ignored). A dead link is reported, not
    fatal: one broken link should not cost the other ninety-nine pictures."""
    urls = [ln.strip() for ln in listing.read_text(encoding="utf-8-sig").splitlines()]
    urls = [u for u in urls if u and not u.startswith("#")]
    bad = [u for u in urls if not is_url(u)]
    if bad or not urls:
        raise FetchError(f"{listing}: expected one http(s) URL per line" + (f"; not a URL: {bad[0]!r}" if bad
                                                                              else ", found none") + ".")
    placed, failed = [], []
    for url in urls:
        try:
            placed += _fetch_url(url, dest, max_bytes, skip)
        except FetchError as e:
            failed.append(str(e))
            skip(url, str(e))
    if not placed:  # the reasons here: a caller's on_skip may only have collected them
        shown = " | ".join(failed[:3]) + (f" | … and {len(failed) - 3} more" if len(failed) > 3 else "")
        raise FetchError(f"{listing}: none of its {len(urls)} URLs gave a picture. " + (
            shown if failed else "Each was left out (not a picture or .zip)."))
    return placed


def free_name(path: Path, overwrite: bool = False) -> Path:
    """`a.png`, or `a-2.png`, `a-3.png`, …: nothing there is silently replaced (two URLs both
    ending in image.png, an export of the same step again) unless `overwrite`."""
    candidate, n = path, 2
    while candidate.exists() and not overwrite:
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def save_uploads(files, dest: Path) -> tuple[list[Path], list[str]]:
    """Uploaded files (ipywidgets 8's FileUpload.value: dicts with name and content) into
    `dest`: pictures as they are, .zip archives extracted safely. Returns (placed, problems)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    placed, problems = [], []
    for f in files:
        name, data = Path(f["name"]).name, bytes(f["content"])
        if name.lower().endswith(".zip"):
            with tempfile.TemporaryDirectory() as tmp:  # on disk, so errors name the upload
                archive = Path(tmp, name)
                archive.write_bytes(data)
                try:
                    placed += extract_zip(archive, dest / archive.stem,
                                          on_skip=lambda n, r: problems.append(f"{name}/{n}: {r}"))
                except FetchError as e:
                    problems.append(str(e).replace(str(archive), name))
        elif is_image_name(name):
            (dest / name).write_bytes(data)
            placed.append(dest / name)
        else:
            problems.append(f"{name}: not a picture or .zip, left out")
    return placed, problems
