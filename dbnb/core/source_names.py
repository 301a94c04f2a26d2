"""How a model source (pretrained_model_name_or_path, a merge input) is told apart and named:
which text is a Hugging Face repo id, and the name a source goes by in files that leave this
machine. Any family's model is named the same way, so this lives below the families."""
from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from dbnb.core import download as downloads

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A file on the Hub by URL: https://huggingface.co/<org>/<name>/resolve/<revision>/<file>
HUB_FILE_URL = re.compile(r"^https://huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+)/(?:resolve|blob)/([^/]+)/(.+)$")
# A repo's folder in a Hugging Face cache (huggingface_hub's layout): models--<org>--<name>
HUB_CACHE_FOLDER = re.compile(r"^models--([A-Za-z0-9][\w.-]*?)--([\w.-]+)$")


def hub_repo(source: str) -> str | None:
    """The Hub repo a model source comes from: a repo id, a huggingface.co file URL, or a path in a
    Hugging Face cache (where notebook 01 leaves a Hub model); None for anything else."""
    text = str(source).strip()
    if found := HUB_FILE_URL.match(text.split("?")[0]):
        return found[1]
    if HUB_ID.match(text) and not Path(text).expanduser().exists():
        return text
    if not text.startswith(("http://", "https://")):
        for part in reversed(re.split(r"[\\/]", text)):
            if found := HUB_CACHE_FOLDER.match(part):
                return f"{found[1]}/{found[2]}"
    return None


def public_name(source: str) -> str:
    """How a base model is named in files that leave this machine (an export's, a LoRA's or a
    merge's metadata): a Hub id as is, and so a Hub model's folder in a Hugging Face cache; a
    local file or folder by its base name, as kohya's scripts do (a full path shows strangers
    the user's Drive folders and account layout); a
    URL without its query or login (where a download token sits); a Drive link as "drive-"
    and the first 10 characters of its id only (the whole id fetches the file), as the merge
    labels it."""
    text = str(source).strip()
    if downloads.is_drive(text):
        try:
            return f"drive-{downloads.drive_link(text)[1][:10]}"
        except downloads.FetchError:
            return "drive"
    if text.startswith(("http://", "https://")):
        url = urllib.parse.urlparse(text)  # a user:password@ goes too
        host = (url.hostname or "") + (f":{url.port}" if url.port else "")
        return urllib.parse.urlunparse(url._replace(netloc=host, params="", query="", fragment=""))
    if HUB_ID.match(text) and not Path(text).expanduser().exists():
        return text
    # both separators: a config written on Windows, read here
    name = re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text
    if not Path(name).suffix and (repo := hub_repo(text)):
        return repo  # a Hub model's folder in the cache is named by its commit: its repo says which model
    return name
