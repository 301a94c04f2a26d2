"""dbnb.data.intake: folders copied, archives extracted safely. No network: downloads (dbnb.core.download)
run the real urllib and gdown against a web server on 127.0.0.1 (conftest's http_server and drive)."""
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from dbnb.core import download
from dbnb.data import intake as fetch
from dbnb.data.intake import FetchError, fetch_images


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
    whole = _make_zip(tmp_path / "whole.zip", {"a.png": _png_bytes()}).read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[:len(whole) // 2])  # a download that stopped part-way
    with pytest.raises(FetchError, match="cut.zip: named .zip but not a complete .zip archive"):
        fetch_images(tmp_path / "cut.zip", tmp_path / "dest")


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
    (tmp_path / "dead.txt").write_text("https://dead.example/x.png\nhttps://dead.example/y.png\n")
    with pytest.raises(FetchError, match=r"none of its 2 URLs gave a picture. Download of https://dead.example/x.png "
                                         r"failed: 404 \| Download of https://dead.example/y.png failed: 404"):
        fetch_images(tmp_path / "dead.txt", tmp_path / "dest", on_skip=lambda n, r: None)  # as prep collects
    (tmp_path / "bad.txt").write_text("not a url\n")
    with pytest.raises(FetchError, match="not a URL: 'not a url'"):
        fetch_images(tmp_path / "bad.txt", tmp_path / "dest")


def test_drive_file_and_folder_links_bring_pictures_with_the_real_gdown(tmp_path, drive):
    link = drive.file("set.zip", _make_zip(tmp_path / "set.zip", {"a.png": _png_bytes()}).read_bytes())
    assert [p.name for p in fetch_images(link, tmp_path / "d1")] == ["a.png"]
    # Every form a Drive file link comes in.
    one = drive.file("one.png", _png_bytes()).split("/")[5]
    for n, form in enumerate((f"https://drive.google.com/open?id={one}",
                              f"https://drive.google.com/uc?export=download&id={one}",
                              f"https://drive.google.com/file/d/{one}",
                              f"https://drive.google.com/file/u/1/d/{one}/view?usp=drive_link")):
        assert [p.name for p in fetch_images(form, tmp_path / f"form{n}")] == ["one.png"], form
    folder = drive.folder("chara", {"b.png": _png_bytes(), "b.txt": b"1girl, smile", "c.doc": b"x",
                                    "more.zip": (tmp_path / "set.zip").read_bytes(),
                                    "front/d.png": _png_bytes((0, 0, 255))})
    skipped = []
    got = fetch_images(folder, tmp_path / "d2", on_skip=lambda n, r: skipped.append(n))
    assert sorted(p.relative_to(tmp_path / "d2").as_posix() for p in got) == ["a.png", "b.png", "front/d.png"]
    assert (tmp_path / "d2" / "b.txt").read_text() == "1girl, smile" and skipped == ["c.doc"]


def test_drive_failures_name_the_cause(tmp_path, drive):
    nobody = "https://drive.google.com/file/d/1NotSharedWithAnyoneAtAll000000/view?usp=sharing"
    with pytest.raises(FetchError, match=r"(?s)would not hand it out \(Cannot retrieve the public link.*"
                                         r"anyone with the link"):
        fetch_images(nobody, tmp_path / "d")
    busy = drive.file("busy.zip", b"")
    drive.server.routes[f"/uc?id={busy.split('/')[5]}"] = (
        b'<html><body><p class="uc-error-subcaption">Too many users have viewed or downloaded this file '
        b"recently.</p></body></html>", {"Content-Type": "text/html; charset=utf-8"})
    with pytest.raises(FetchError, match="Too many users have viewed.*make a copy in your own Drive"):
        fetch_images(busy, tmp_path / "d")
    with pytest.raises(FetchError, match="Google Drive folder .*anyone with the link"):
        fetch_images("https://drive.google.com/drive/folders/1NotSharedFolder0000000000000", tmp_path / "d")
    with pytest.raises(FetchError, match="is empty"):
        fetch_images(drive.folder("nothing", {}), tmp_path / "d")
    with pytest.raises(FetchError, match="holds no id.*Copy link"):
        fetch_images("https://drive.google.com/drive/my-drive", tmp_path / "d")
    drive.server.url = "http://127.0.0.1:9"  # nothing listens: as if offline
    with pytest.raises(FetchError, match="could not be reached"):
        fetch_images(drive.file("x.png", _png_bytes()), tmp_path / "d")
    assert not list((tmp_path / "d").iterdir())


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
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(FetchError, match="slow.png failed: timed out"):
        fetch_images(http_server.url + "/slow.png", tmp_path / "dest")
    assert time.monotonic() - start < 5
    assert not list((tmp_path / "dest").iterdir())
