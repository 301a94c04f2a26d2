"""dbnb.fetch: folders copied, archives extracted safely. No network: remote paths are thin
wrappers around gdown / urllib and are only tested with those replaced."""
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from dbnb import fetch
from dbnb.fetch import FetchError, fetch_images


def _png_bytes(color=(255, 0, 0)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] = {}) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def test_folder_copy_is_recursive_and_leaves_originals(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(_png_bytes())
    (src / "a.txt").write_text("1girl, smile")
    (src / "sub" / "b.JPG").write_bytes(_png_bytes((0, 255, 0)))
    (src / "notes.pdf").write_bytes(b"%PDF")
    (src / ".DS_Store").write_bytes(b"junk")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    skipped = []

    got = fetch_images(src, tmp_path / "dest", on_skip=lambda n, r: skipped.append(n))

    assert sorted(p.relative_to(tmp_path / "dest").as_posix() for p in got) == ["a.png", "sub/b.JPG"]
    assert _tree(tmp_path / "dest") == {"a.png", "a.txt", "sub/b.JPG"}  # the caption came along
    assert (tmp_path / "dest" / "a.png").read_bytes() == before[src / "a.png"]
    assert skipped == ["notes.pdf"]  # junk is dropped silently, real files are reported
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_folder_with_destination_inside_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png_bytes())
    got = fetch_images(src, src / "out")
    assert [p.name for p in got] == ["a.png"]
    assert fetch_images(src, src / "out") == got  # the copy is not copied into itself
    with pytest.raises(FetchError, match="same folder"):
        fetch_images(src, src)


def test_normal_zip_with_nested_folders(tmp_path):
    archive = _make_zip(tmp_path / "set.zip", {
        "chara/front.png": _png_bytes(), "chara/more/back.webp": _png_bytes(), "chara/front.txt": b"smile",
        "__MACOSX/chara/._front.png": b"apple double", "readme.md": b"hi"})
    skipped = []
    got = fetch_images(archive, tmp_path / "dest", on_skip=lambda n, r: skipped.append(n))
    assert sorted(p.relative_to(tmp_path / "dest").as_posix() for p in got) == \
        ["chara/front.png", "chara/more/back.webp"]
    assert _tree(tmp_path / "dest") == {"chara/front.png", "chara/more/back.webp", "chara/front.txt"}
    assert got[0].read_bytes() == _png_bytes()
    assert skipped == ["readme.md"]


def test_zip_names_from_japanese_windows_are_read_as_cp932():
    # zipfile cannot write a cp932 name without the UTF-8 flag, so build the entry as read back.
    info = zipfile.ZipInfo("x")
    info.filename = "花月/立ち絵.png".encode("cp932").decode("cp437")
    assert fetch._entry_name(info) == "花月/立ち絵.png"
    utf8 = zipfile.ZipInfo("花月.png")
    utf8.flag_bits |= 0x800
    assert fetch._entry_name(utf8) == "花月.png"


@pytest.mark.parametrize("entry, why", [("../evil.png", "outside"), ("/abs.png", "absolute"),
                                        ("ok/../../evil.png", "outside"), ("C:/win.png", "absolute")])
def test_zip_escaping_entries_are_refused_by_name(tmp_path, entry, why):
    archive = _make_zip(tmp_path / "bad.zip", {"good.png": _png_bytes(), entry: _png_bytes()})
    dest = tmp_path / "box" / "dest"
    with pytest.raises(FetchError, match=why) as err:
        fetch_images(archive, dest)
    assert repr(entry) in str(err.value)
    assert _tree(tmp_path) == {"bad.zip"}  # nothing written, not even the good entry


def test_zip_symlink_entry_is_refused(tmp_path):
    archive = _make_zip(tmp_path / "link.zip", {"good.png": _png_bytes()}, symlinks={"sneaky.png": "/etc/passwd"})
    with pytest.raises(FetchError, match="'sneaky.png' is a symbolic link"):
        fetch_images(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "sneaky.png").exists() and not (tmp_path / "dest" / "good.png").exists()


def test_zip_bomb_is_refused(tmp_path):
    archive = _make_zip(tmp_path / "bomb.zip", {"big.png": b"\0" * (4 << 20)})
    assert archive.stat().st_size < 100_000
    with pytest.raises(FetchError, match=r"bomb.zip.*expand to 4,194,304 bytes.*1,048,576"):
        fetch_images(archive, tmp_path / "dest", max_bytes=1 << 20)
    assert _tree(tmp_path / "dest") == set()


def test_zip_entry_that_lies_about_its_size_is_stopped(tmp_path):
    archive = _make_zip(tmp_path / "liar.zip", {"big.png": b"\0" * (2 << 20)})
    with zipfile.ZipFile(archive) as zf:
        info = zf.infolist()[0]
        info.file_size = 10  # what a crafted archive's directory would claim
        with pytest.raises(FetchError, match="'big.png' (expands past|cannot be read)"):
            fetch._copy_entry(zf, info, tmp_path / "dest" / "big.png", 1 << 20, archive, "big.png")
    assert not (tmp_path / "dest" / "big.png").exists()


def test_single_picture_and_bad_sources(tmp_path):
    pic = tmp_path / "one.png"
    pic.write_bytes(_png_bytes())
    assert [p.name for p in fetch_images(pic, tmp_path / "dest")] == ["one.png"]
    with pytest.raises(FetchError, match="does not exist"):
        fetch_images(tmp_path / "missing", tmp_path / "dest")
    with pytest.raises(FetchError, match="No image source"):
        fetch_images("", tmp_path / "dest")
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(FetchError, match="x.pdf: not a picture"):
        fetch_images(tmp_path / "x.pdf", tmp_path / "dest")


def test_url_list_reports_dead_links_and_keeps_the_rest(tmp_path, monkeypatch):
    served = {"https://a.example/1.png": _png_bytes(), "https://b.example/img/1.png": _png_bytes((0, 0, 255))}

    def fake_download(url, tmp, max_bytes):
        if url not in served:
            raise FetchError(f"Download of {url} failed: 404")
        target = fetch.free_name(tmp / Path(url).name)
        target.write_bytes(served[url])
        return target

    monkeypatch.setattr(fetch, "_download", fake_download)
    listing = tmp_path / "urls.txt"
    listing.write_text("# my pictures\nhttps://a.example/1.png\n\nhttps://dead.example/x.png\n"
                       "https://b.example/img/1.png\n")
    skipped = []
    got = fetch_images(listing, tmp_path / "dest", on_skip=lambda n, r: skipped.append(n))
    assert sorted(p.name for p in got) == ["1-2.png", "1.png"]  # same names do not overwrite
    assert skipped == ["https://dead.example/x.png"]
    (tmp_path / "bad.txt").write_text("not a url\n")
    with pytest.raises(FetchError, match="not a URL: 'not a url'"):
        fetch_images(tmp_path / "bad.txt", tmp_path / "dest")


def test_drive_links_go_through_gdown(tmp_path, monkeypatch):
    import gdown

    calls = []

    def fake_download(url, output, fuzzy, quiet):
        calls.append(("file", url, fuzzy))
        return str(_make_zip(Path(output) / "set.zip", {"a.png": _png_bytes()}))

    def fake_folder(url, output, quiet):
        calls.append(("folder", url))
        out = Path(output)
        (out / "b.png").write_bytes(_png_bytes())
        (out / "c.doc").write_bytes(b"x")
        return [str(out / "b.png"), str(out / "c.doc")]

    monkeypatch.setattr(gdown, "download", fake_download)
    monkeypatch.setattr(gdown, "download_folder", fake_folder)
    got = fetch_images("https://drive.google.com/file/d/abc/view?usp=sharing", tmp_path / "d1")
    assert [p.name for p in got] == ["a.png"] and calls[0][2] is True
    skipped = []
    got = fetch_images("https://drive.google.com/drive/folders/xyz", tmp_path / "d2",
                       on_skip=lambda n, r: skipped.append(n))
    assert [p.name for p in got] == ["b.png"] and skipped == ["c.doc"]
    monkeypatch.setattr(gdown, "download", lambda *a, **k: None)
    with pytest.raises(FetchError, match="anyone with the link"):
        fetch_images("https://drive.google.com/file/d/abc/view", tmp_path / "d3")


def test_url_download_is_real_and_named_by_its_type(tmp_path, http_server):
    http_server.routes["/pic"] = (_png_bytes((0, 255, 0)), {"Content-Type": "image/png"})
    got = fetch_images(http_server.url + "/pic", tmp_path / "dest")
    assert [p.name for p in got] == ["pic.png"] and got[0].read_bytes() == _png_bytes((0, 255, 0))


def test_url_download_over_the_size_cap_is_refused(tmp_path, http_server):
    def endless(out, release):  # no Content-Length: only the bytes that arrive can tell
        for _ in range(64):
            out.write(b"\0" * 1024)

    http_server.routes["/big.png"] = (endless, {"Content-Type": "image/png"})
    http_server.routes["/said-big.png"] = (b"\0" * 5000, {"Content-Type": "image/png"})
    for path in ("/big.png", "/said-big.png"):
        with pytest.raises(FetchError, match="larger than 4,096 bytes"):
            fetch_images(http_server.url + path, tmp_path / "dest", max_bytes=4096)
    assert not list((tmp_path / "dest").iterdir())


def test_stalled_download_times_out(tmp_path, http_server, monkeypatch):
    import time

    def stall(out, release):
        out.write(b"\x89PNG")
        out.flush()
        release.wait(30)

    http_server.routes["/slow.png"] = (stall, {"Content-Type": "image/png"})
    monkeypatch.setattr(fetch, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(FetchError, match="slow.png failed: timed out"):
        fetch_images(http_server.url + "/slow.png", tmp_path / "dest")
    assert time.monotonic() - start < 5
    assert not list((tmp_path / "dest").iterdir())
