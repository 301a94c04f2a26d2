"""Downloads: an http(s) URL by urllib, a Google Drive file or folder link by gdown. The one
place that knows what a URL and a Drive address look like and how gdown is called, so the picture
intake (dbnb.data.intake) and the model finder (dbnb.family.source) fetch the same way and fail with the
same advice.
"""
from __future__ import annotations

import inspect
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

from dbnb.core.errors import DbnbError
from dbnb.core.progress import bar

# Bytes read at a time, from a response or an archive entry: a model is gigabytes, never read whole.
CHUNK = 1 << 20
# Seconds a download may go without a byte before it is given up (a stalled server, not a slow one).
DOWNLOAD_TIMEOUT_S = 60


class FetchError(DbnbError, ValueError):
    """A source cannot be brought in; the message names the source or entry and what to do."""


DRIVE_HOSTS = ("drive.google.com", "docs.google.com")


def is_url(text: str) -> bool:
    """An http(s) address (the scheme in any case), not a path on this machine."""
    return text.strip().lower().startswith(("http://", "https://"))


def is_drive(url: str) -> bool:
    return urllib.parse.urlsplit(url).hostname in DRIVE_HOSTS


def drive_link(url: str) -> tuple[str, str]:
    """("file" | "folder", id) of a Drive share link. dbnb reads the id itself and hands gdown
    only the id: gdown 5 needed `fuzzy=True` to read one from a `/file/d/<id>/view` link and
    gdown 6 removed that argument, while `id=` means the same in both."""
    parts = urllib.parse.urlsplit(url)
    folder = re.search(r"/folders/([-\w]+)", parts.path)
    if folder:
        return "folder", folder.group(1)
    file = re.search(r"/d/([-\w]+)", parts.path) or re.fullmatch(r"([-\w]+)", "".join(
        urllib.parse.parse_qs(parts.query).get("id", [""])[:1]))
    if file and file.group(1):
        return "file", file.group(1)
    raise FetchError(f"{url}: a Google Drive address, but not the link of one file or folder (it holds no id). "
                     "In Drive, right-click the file or folder → Share → Copy link: it looks like "
                     "https://drive.google.com/file/d/…/view or https://drive.google.com/drive/folders/….")


def fetch_drive(url: str, into: Path) -> Path:
    """A Drive file or folder link, downloaded into the folder `into` by gdown. Returns the file,
    named as on Drive, or `into` itself for a folder (its tree inside; gdown 5 stops at 50 files
    per folder). Anything gdown or the connection raises becomes a FetchError saying why; a
    programming error (a TypeError from a changed gdown) keeps its traceback. gdown has no size
    cap, so fetch_images' max_bytes bounds what Drive archives expand to, not the download."""
    import gdown  # lazy: loads gdown
    import requests  # lazy: loads requests

    kind, drive_id = drive_link(url)
    get = gdown.download_folder if kind == "folder" else gdown.download
    # Drive links dbnb reads are shared with anyone, and the confirmation page of a large file
    # needs only the session's own cookies, so nothing is read from or left in ~/.cache/gdown.
    options = dict(id=drive_id, quiet=False, use_cookies=False)
    if "timeout" in inspect.signature(get).parameters:  # gdown >= 6: a stalled Drive is given up
        options["timeout"] = DOWNLOAD_TIMEOUT_S
    # A folder: gdown writes its tree into `into`. A file: a path ending in the separator makes
    # gdown keep the name Drive gives (gdown 5 and 6 alike).
    output = str(into) if kind == "folder" else str(into) + os.sep
    what = "Google Drive folder" if kind == "folder" else "Google Drive file"
    try:
        got = get(output=output, **options)
    except requests.RequestException as e:
        raise FetchError(f"{what} {url}: Google Drive could not be reached ({e}). Check the connection "
                         "and try again.") from None
    except OSError as e:
        raise FetchError(f"{what} {url}: writing the download to {into} failed ({e}). Free some disk "
                         "space (or pick another folder) and try again.") from None
    except _gdown_errors(gdown) as e:
        if type(e).__name__ == "FolderContentsMaximumLimitError":
            raise FetchError(f"{what} {url} holds more than 50 files, more than gdown 5 fetches from one "
                             "folder: zip the pictures and share the .zip (or update gdown).") from None
        raise FetchError(f"{what} {url}: Google Drive would not hand it out ({_gdown_reason(e)}). "
                         + _DRIVE_FIX) from None
    if got == []:
        raise FetchError(f"{what} {url} is empty: put the pictures or "
                         "model files themselves in it.")
    if not got:  # gdown 5 returns False / None instead of raising for a folder it cannot list
        raise FetchError(f"{what} {url}: Google Drive gave no files. " + _DRIVE_FIX)
    return into if kind == "folder" else Path(got)


_DRIVE_FIX = ("Share it as 'anyone with the link' (Share → General access). If it is shared, Drive may be "
              "refusing it for today (too many downloads of this file): make a copy in your own Drive, or on "
              "Colab mount Drive and give the path under /content/drive instead of the link.")


def _gdown_errors(gdown) -> tuple[type, ...]:
    """What gdown raises when Drive refuses: its own exceptions (they differ between 5 and 6) and,
    in gdown 5, a RuntimeError for a folder page it cannot read (not shared)."""
    own = tuple(e for e in vars(gdown.exceptions).values() if isinstance(e, type) and issubclass(e, Exception))
    return own + (RuntimeError,)


def _gdown_reason(error: Exception) -> str:
    """gdown's own words without its framing ("Failed to retrieve file url: … but Gdown can't")."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.removeprefix("Failed to retrieve file url: ")
    return text.split(" You may still be able to access")[0].rstrip(". ")


def download(url: str, target: Path, *, max_bytes: int | None = None, progress: bool = False) -> str:
    """dbnb's one urllib download: `url` into `target`, at most `max_bytes`, given up after
    DOWNLOAD_TIMEOUT_S without a byte, HF_TOKEN sent to huggingface.co (a gated model), with a
    progress bar if asked. A failed download leaves no file. Returns the response's content type."""
    request = urllib.request.Request(url, headers={"User-Agent": "dbnb"})
    token = os.environ.get("HF_TOKEN")
    if token and "huggingface.co" in url:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with bar(total=total, unit="B", unit_scale=True, desc=target.name[:40], disable=not progress) as shown:
                size = 0
                while chunk := response.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise FetchError(f"{url}: larger than {max_bytes:,} bytes; refusing it.")
                    out.write(chunk)
                    shown.update(len(chunk))
            return response.headers.get_content_type()
    except FetchError:
        target.unlink(missing_ok=True)
        raise
    except OSError as e:
        target.unlink(missing_ok=True)
        raise FetchError(f"Download of {url} failed: {e}. Check the URL and your connection.") from None
