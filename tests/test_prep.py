"""dbnb.prep: every picture the tests use is drawn here; the segmenter is a tiny ONNX model with
isnetis.onnx's contract (built by the test), faces are boxes given by hand. Nothing is downloaded."""
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dbnb.core.config import Config
from dbnb.data.dataset import build_prompt, caption_for, list_images
from dbnb.data.pictures import dhash, hamming
from dbnb.prep import (BadImage, PrepError, Segmenter, SegmenterError, caption, framing_crops, framing_of,
                       framing_regions, load_image, make_square, prepare_dataset, write_stand_in_model)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return Segmenter(write_stand_in_model(tmp_path_factory.mktemp("model") / "isnetis.onnx"))


def prep(src, out, **kw):
    kw.setdefault("remove_background", False)
    kw.setdefault("face_detector", None)
    kw.setdefault("resolution", 64)
    return prepare_dataset(src=src, out=out, progress=False, **kw)


def figure(size=(200, 400), bg=WHITE, body=(0, 0, 0)) -> Image.Image:
    """A standing 'character': a dark body with a red head, centred, with margin all round."""
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    w, h = size
    d.rectangle((w * 0.3, h * 0.15, w * 0.7, h * 0.95), fill=body)
    d.ellipse((w * 0.35, h * 0.03, w * 0.65, h * 0.17), fill=RED)
    return im


def png16(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG written by hand (Pillow cannot create one)."""
    h, w, c = array.shape
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def px(im, xy):
    return im.getpixel(xy)


# --- every mode ----------------------------------------------------------------------------------

def _mode_file(tmp_path, mode) -> tuple[Path, tuple, bool]:
    """(file, expected RGBA at (0, 0), expected has_alpha)."""
    p = tmp_path / f"{mode}.png"
    if mode == "RGB":
        Image.new("RGB", (8, 8), RED).save(p)
        return p, (255, 0, 0, 255), False
    if mode == "RGBA":
        Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(p)
        return p, (255, 0, 0, 0), True
    if mode == "LA":
        Image.new("LA", (8, 8), (128, 0)).save(p)
        return p, (128, 128, 128, 0), True
    if mode == "L":
        Image.new("L", (8, 8), 128).save(p)
        return p, (128, 128, 128, 255), False
    if mode == "1":
        Image.new("1", (8, 8), 1).save(p)
        return p, (255, 255, 255, 255), False
    if mode == "P+transparency":
        im = Image.new("P", (8, 8), 0)
        im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        im.save(p, transparency=0)
        return p, (255, 0, 0, 0), True
    if mode == "CMYK":
        p = p.with_suffix(".tif")
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p)
        return p, (255, 0, 0, 255), False
    if mode == "I;16":  # 16-bit gray: Pillow's own convert would clip 32896 to white
        Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(p)
        return p, (128, 128, 128, 255), False
    if mode == "RGB 16-bit":
        a = np.zeros((8, 8, 3), np.uint16)
        a[..., 0], a[..., 1] = 65535, 128 * 257
        p.write_bytes(png16(a))
        return p, (255, 128, 0, 255), False
    if mode == "RGBA 16-bit":
        a = np.zeros((8, 8, 4), np.uint16)
        a[..., 2] = 65535
        p.write_bytes(png16(a))
        return p, (0, 0, 255, 0), True
    if mode == "F":
        p = p.with_suffix(".tif")
        Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(p)
        return p, (128, 128, 128, 255), False
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P+transparency", "CMYK", "I;16",
                                  "RGB 16-bit", "RGBA 16-bit", "F"])
def test_every_mode_becomes_rgba(tmp_path, mode):
    path, expected, has_alpha = _mode_file(tmp_path, mode)
    loaded = load_image(path)
    assert loaded.image.mode == "RGBA" and loaded.image.size == (8, 8)
    assert px(loaded.image, (0, 0)) == pytest.approx(expected, abs=1)
    assert loaded.has_alpha is has_alpha


def test_transparent_pixels_go_on_the_background_not_black(tmp_path):
    im = Image.new("RGBA", (40, 80), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((10, 10, 30, 70), fill=(0, 0, 255, 255))
    im.save(tmp_path / "src.png")
    (tmp_path / "src.png").rename(tmp_path / "cut.png")
    (tmp_path / "in").mkdir()
    (tmp_path / "cut.png").rename(tmp_path / "in" / "cut.png")
    report = prep(tmp_path / "in", tmp_path / "out")
    out = Image.open(report.images[0])
    assert px(out, (1, 1)) == WHITE and px(out, (32, 32))[2] > 240
    assert any("transparency put on white" in d for d in report.files[0].done)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), BLUE)
    im.paste(RED, (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    im.save(tmp_path / "phone.png", exif=exif)
    loaded = load_image(tmp_path / "phone.png")
    assert loaded.image.size == (10, 20)
    assert px(loaded.image, (5, 2))[:3] == RED and px(loaded.image, (5, 17))[:3] == BLUE
    assert loaded.done == ["EXIF orientation 6 applied"]


def test_animated_file_takes_the_first_frame_with_a_warning(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    loaded = load_image(tmp_path / "anim.gif")
    assert px(loaded.image, (0, 0))[:3] == pytest.approx(RED, abs=2)
    assert loaded.warnings == ["animated (2 frames): only the first frame is used"]


# --- broken files --------------------------------------------------------------------------------

def _noise_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name, data, reason", [
    ("empty.png", b"", "empty file"),
    ("text.png", b"this is not a picture", "not a picture Pillow can read"),
    ("half.png", _noise_bytes("PNG")[:600], "truncated"),
    ("half.jpg", _noise_bytes("JPEG")[:700], "truncated"),
])
def test_broken_files_are_refused_with_a_reason(tmp_path, name, data, reason):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(BadImage, match=reason):
        load_image(tmp_path / name)


def test_decompression_bomb_limit_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")  # 4096 px > 2x the limit: refused
    with pytest.raises(BadImage, match="decompression-bomb"):
        load_image(tmp_path / "bomb.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600 px: between 1x and 2x, a warning
    assert load_image(tmp_path / "big.png").warnings[0].startswith("very large (40x40)")


def test_a_bad_file_never_stops_the_run_and_the_report_lists_every_file_once(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    figure().save(src / "a.png")
    figure((300, 300), body=BLUE).save(src / "sub" / "b.jpg", quality=95)
    figure((240, 260), body=GREEN).save(src / "c.webp")
    (src / "a_copy.png").write_bytes((src / "a.png").read_bytes())
    figure().resize((100, 200)).save(src / "a_small.jpg", quality=90)  # near duplicate of a
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("nope")
    (src / "half.png").write_bytes(_noise_bytes("PNG")[:600])
    (src / "readme.md").write_text("my pictures")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}

    report = prep(src, tmp_path / "out")

    sources = [f.source for f in report.files]
    assert sorted(sources) == sorted({p.relative_to(src).as_posix() for p in before})  # each once
    status = {f.source: f.status for f in report.files}
    assert status == {"a.png": "prepared", "a_copy.png": "duplicate", "a_small.jpg": "prepared",
                      "c.webp": "prepared", "empty.png": "failed", "half.png": "failed", "readme.md": "ignored",
                      "sub/b.jpg": "prepared", "text.png": "failed"}
    row = {f.source: f for f in report.files}
    assert row["a_copy.png"].warnings == ["exact duplicate of a.png: left out"]
    assert any(w.startswith("near duplicate of a_small.jpg") for w in row["a.png"].warnings)
    assert "duplicate" in " ".join(report.warnings) and "3 file(s) could not be used" in " ".join(report.warnings)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # originals untouched
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(md.count(f"| {s} |") == 1 for s in sources)
    assert sorted(list_images(tmp_path / "out", "instance_data_dir")) == sorted(report.images)  # no sheet


def test_dhash_sees_resized_copies_and_tells_different_pictures_apart():
    a = figure()
    assert hamming(dhash(a), dhash(a.resize((90, 180)))) <= 3
    assert hamming(dhash(a), dhash(a.transpose(Image.Transpose.ROTATE_180))) > 10


# --- zip sources ---------------------------------------------------------------------------------

def test_zip_source_is_extracted_safely(tmp_path):
    good = io.BytesIO()
    figure().save(good, "PNG")
    ok = tmp_path / "ok.zip"
    with zipfile.ZipFile(ok, "w") as zf:
        zf.writestr("chara/front/a.png", good.getvalue())
        zf.writestr("chara/b.png", good.getvalue()[:-1] + b"x")  # different bytes, same picture
    report = prep(ok, tmp_path / "out")
    assert [f.source for f in report.files] == ["chara/b.png", "chara/front/a.png"]
    assert len(report.images) == 2

    for entry in ("../evil.png", "/abs.png"):
        bad = tmp_path / "box" / "bad.zip"
        bad.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("fine.png", good.getvalue())
            zf.writestr(entry, good.getvalue())
        with pytest.raises(PrepError, match=f"'{entry}'"):
            prep(bad, tmp_path / "box" / "out")
        assert {p.name for p in (tmp_path / "box").rglob("*.png")} == set()  # nothing anywhere


# --- square and size -----------------------------------------------------------------------------

def _dark_bbox(im: Image.Image, below=128):
    a = np.asarray(im.convert("L")) < below
    ys, xs = np.nonzero(a)
    return xs.min(), ys.min(), xs.max(), ys.max()


def test_pad_keeps_the_whole_character_and_shows_no_band(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    figure((200, 400)).save(src / "tall.png")
    report = prep(src, tmp_path / "out", resolution=128)
    out = Image.open(report.images[0]).convert("RGB")
    assert out.size == (128, 128)
    # The character spans x 60-140, y 12-380 of 200x400 (head to feet): padded to 400x400,
    # so x moves by 100, then everything is scaled by 128/400.
    x0, y0, x1, y1 = _dark_bbox(out, below=250)
    assert (x0, y0, x1, y1) == pytest.approx((51, 4, 77, 122), abs=2)
    a = np.asarray(out).astype(int)
    outside = np.ones(a.shape[:2], bool)
    outside[y0 - 2:y1 + 3, x0 - 2:x1 + 3] = False
    assert a[outside].min() >= 250  # all white around it: no band where the padding meets the picture
    assert report.files[0].done[:1] == ["padded to square"] and report.files[0].warnings == []


def test_pad_continues_an_off_white_background_and_warns_on_busy_edges(tmp_path):
    paper = (246, 240, 232)
    square = make_square(figure((100, 200), bg=paper), "pad", 64, "white")[0]
    a = np.asarray(square).astype(int)
    assert np.abs(a[:, :4] - paper).max() <= 2 and np.abs(a[:, -4:] - paper).max() <= 2
    busy = Image.effect_noise((100, 200), 80).convert("RGB")
    _, _, warns = make_square(busy, "pad", 64, "white")
    assert warns and "band" in warns[0]


def test_center_and_face_squares_and_low_resolution_flag():
    im = figure((200, 400))
    center, done, warns = make_square(im, "center", 128, "white")
    assert done == ["center-cropped", "resized to 128"] and warns == []
    assert (np.asarray(center)[..., 1] < 60).sum() > 0  # body is in the middle
    red = (np.asarray(center)[..., 0] > 200) & (np.asarray(center)[..., 1] < 60)
    assert not red.any()  # the head (top of a tall picture) is cut away by a center crop
    face, done, _ = make_square(im, "face", 128, "white", face=(80, 20, 40, 40))
    red = (np.asarray(face)[..., 0] > 200) & (np.asarray(face)[..., 1] < 60)
    assert red.any() and done[0] == "cropped around the face"
    _, _, warns = make_square(im, "face", 512, "white", face=None)
    assert warns == ["no face found for square_mode=face: padded instead",
                     "low resolution: 400px square, upscaled to 512"]


def _bust_up(touching: bool) -> Image.Image:
    """A wide cut-out (transparent background): head and torso, the torso cut by the bottom edge
    when `touching`, else ending 20 px above it."""
    im = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((80, 5, 120, 45), fill=RED + (255,))
    d.rectangle((60, 45, 140, 99 if touching else 79), fill=(0, 0, 0, 255))
    return im


def test_a_wide_bust_up_cut_by_the_bottom_edge_is_padded_onto_the_bottom(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _bust_up(True).save(src / "cut.png")
    _bust_up(False).save(src / "whole.png")
    report = prep(src, tmp_path / "out", resolution=200)
    row = {f.source: f for f in report.files}
    out = {name: Image.open(report.out_dir / next(iter(row[name].outputs))).convert("RGB")
           for name in ("cut.png", "whole.png")}
    # 200x100 on a 200x200 square. On the bottom: the picture at y 100-200, the cut torso on the
    # last row and all the padding above the head; centred: y 50-150.
    assert _dark_bbox(out["cut.png"])[1:4:2] == pytest.approx((105, 199), abs=1)
    assert np.asarray(out["cut.png"])[:100].min() >= 250  # white above, nothing under the cut
    assert row["cut.png"].done[1] == "padded to square, on the bottom edge (the character reaches it)"
    assert _dark_bbox(out["whole.png"])[1:4:2] == pytest.approx((55, 129), abs=1)  # stays centred
    assert row["whole.png"].done[1] == "padded to square"
    alpha = prep(src, tmp_path / "alpha", resolution=200, keep_alpha=True)
    cut = Image.open(alpha.out_dir / next(iter(next(f for f in alpha.files if f.source == "cut.png").outputs)))
    assert cut.mode == "RGBA" and px(cut, (100, 199))[3] == 255 and px(cut, (100, 60))[3] == 0


def test_without_a_mask_a_plain_top_over_a_busy_bottom_edge_goes_on_the_bottom():
    im = Image.new("RGB", (200, 100), WHITE)
    ImageDraw.Draw(im).rectangle((60, 45, 140, 99), fill=BLUE)  # cut by the bottom edge
    square, done, warns = make_square(im, "pad", 100, "white")
    assert done[0].startswith("padded to square, on the bottom edge") and warns == []  # no band: all above
    assert np.asarray(square)[:72].min() >= 250 and np.asarray(square)[99, 50][2] > 200
    im = Image.new("RGB", (200, 100), WHITE)
    ImageDraw.Draw(im).rectangle((60, 30, 140, 70), fill=BLUE)
    _, done, _ = make_square(im, "pad", 100, "white")
    assert done[0] == "padded to square"


# --- background removal --------------------------------------------------------------------------

def _red_on_green(size=(300, 150), box=(30, 40, 90, 110)):
    im = Image.new("RGB", size, GREEN)
    ImageDraw.Draw(im).rectangle(box, fill=RED)
    return im


def test_segmenter_contract_mask_and_composite(segmenter):
    assert segmenter.size == 1024 and segmenter.input_name == "img"
    im = _red_on_green()
    mask = segmenter(im)
    assert mask.mode == "L" and mask.size == im.size
    assert px(mask, (60, 75)) > 250 and px(mask, (200, 75)) < 5 and px(mask, (60, 20)) < 5  # aligned


def test_segmented_picture_is_composited_onto_white(tmp_path, segmenter):
    src = tmp_path / "src"
    src.mkdir()
    _red_on_green().save(src / "chara.png")
    report = prep(src, tmp_path / "out", remove_background=True, segmenter=segmenter, resolution=128)
    out = Image.open(report.images[0]).convert("RGB")
    # 300x150 padded to 300² (picture at y 75-225), scaled by 128/300.
    assert px(out, (25, 64))[0] > 240 and px(out, (25, 64))[1] < 30  # the character stays red
    assert min(px(out, (100, 64))) >= 250 and min(px(out, (64, 10))) >= 250  # green and padding: white
    assert "background removed, put on white" in report.files[0].done


def test_segmentation_model_errors_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    src.mkdir()
    figure().save(src / "a.png")
    with pytest.raises(SegmenterError, match="segmentation_model 'no/such-repo'.*isnetis.onnx"):
        prep(src, tmp_path / "out", remove_background=True, segmentation_model="no/such-repo")
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    with pytest.raises(SegmenterError, match="broken.onnx: onnxruntime cannot load it"):
        prep(src, tmp_path / "out", remove_background=True, segmentation_model=str(tmp_path / "broken.onnx"))


# --- faces and framings --------------------------------------------------------------------------

FACE = (170, 95, 60, 60)  # x, y, w, h in a 400x1000 full-body picture


def full_body() -> Image.Image:
    """Transparent background (its alpha is the mask), hair from y=60, feet at y=950."""
    im = Image.new("RGBA", (400, 1000), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((150, 60, 250, 170), fill=(120, 60, 20, 255))  # hair / head
    d.rectangle(FACE[:2] + (FACE[0] + FACE[2], FACE[1] + FACE[3]), fill=(250, 220, 200, 255))
    d.rectangle((140, 170, 260, 950), fill=(30, 30, 90, 255))
    return im


def test_framing_from_the_face_share():
    subject = (140, 60, 260, 950)
    assert framing_of(FACE, subject) == "full body"
    assert framing_of((0, 0, 100, 100), (0, 0, 400, 400)) == "bust"
    assert framing_of((0, 0, 200, 200), (0, 0, 400, 400)) == "face"
    assert framing_of(None, subject) == "unknown"


def test_crops_from_a_face_box_keep_head_to_chest():
    subject = (140, 60, 260, 950)
    regions = framing_regions(FACE, subject, (400, 1000))
    assert set(regions) == {"bust", "cowboy"}  # never a face-only close-up
    x, y, w, h = FACE
    for left, top, side in regions.values():
        assert top <= 60 and left <= x and left + side >= x + w  # the whole head, hair included
        assert top + side >= y + 3 * h  # down to the chest at least
        assert side < 0.9 * (subject[3] - subject[1])  # a real crop, not the picture again
    assert regions["cowboy"][2] > regions["bust"][2]
    crops = framing_crops(full_body().convert("RGB"), FACE, subject, 128, "white")
    assert {k: v[0].size for k, v in crops.items()} == {"bust": (128, 128), "cowboy": (128, 128)}
    assert framing_regions((150, 30, 100, 100), (0, 0, 400, 400), (400, 400)) == {}  # a bust-up: no crops


def test_extra_framings_and_captions_read_by_the_trainer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    full_body().save(src / "hanatsuki.png")
    figure((300, 300)).save(src / "tagged.png")
    (src / "tagged.txt").write_text("1girl, red hair\n")
    cfg = Config(instance_token="nanU", class_token="Unan", extra_framings=True, remove_background=False,
                 caption_template="[instance_token] [class_token], [framing], smile", resolution=256)
    report = prepare_dataset(cfg, src=src, out=tmp_path / "out", progress=False,
                             face_detector=lambda im: [FACE] if im.size == (400, 1000) else [])
    row = {f.source: f for f in report.files}
    outputs = row["hanatsuki.png"].outputs
    assert sorted(outputs.values()) == ["bust", "cowboy", "full body"]
    assert report.counts == {"face": 0, "bust": 2, "full body": 1, "unknown": 1}
    expected = {"full body": "nanU Unan, full body, smile", "bust": "nanU Unan, upper body, smile",
                "cowboy": "nanU Unan, cowboy shot, smile"}
    for name, framing in outputs.items():
        image = tmp_path / "out" / name
        assert caption_for(image) == expected[framing]
        assert build_prompt("[filewords]", image, "nanU", "Unan") == expected[framing]
        assert build_prompt("photo of [filewords]", image, "nanU", "Unan") == "photo of " + expected[framing]
    tagged = tmp_path / "out" / next(iter(row["tagged.png"].outputs))
    assert caption_for(tagged) == "nanU Unan, smile, 1girl, red hair"  # framing unknown: left out


def test_the_framing_line_tells_no_detector_from_no_face_found(tmp_path):
    """animeface installed and simply finding no face must not be told to install animeface."""
    src = tmp_path / "src"
    src.mkdir()
    figure((300, 300)).save(src / "a.png")

    def animeface(rgb):
        return []
    animeface.name = "animeface"

    found_none = prep(src, tmp_path / "out1", face_detector=animeface).summary()
    assert "animeface found no face in 1 picture(s)" in found_none and "pip install" not in found_none
    absent = prep(src, tmp_path / "out2", face_detector=None).summary()
    assert "no face detector is installed (`pip install animeface`" in absent


def test_caption_template_rules():
    assert caption("[instance_token] [class_token]", "nanU", "Unan") == "nanU Unan"
    assert caption("[instance_token] [class_token]", "nanU", "Unan", tags="1girl") == "nanU Unan, 1girl"
    assert caption("[instance_token] [class_token]", "nanU", "Unan", tags="nanU girl, smile") == "nanU girl, smile"
    assert caption("[instance_token], [framing], x", "nanU", "", framing="unknown") == "nanU, x"


# --- report, advice, re-runs ---------------------------------------------------------------------

def test_advice_few_images_close_ups_and_low_resolution(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    figure((40, 40)).save(src / "tiny.png")
    figure((100, 100), body=BLUE).save(src / "b.png")
    report = prep(src, tmp_path / "out", face_detector=lambda im: [(0, 0, im.width // 2, im.height // 2)])
    text = " ".join(report.warnings)
    assert "only 2 usable picture(s)" in text
    assert "face close-up" in text and report.counts["face"] == 2
    assert "smaller than 64px" in text and "tiny.png" in text
    sheet = Image.open(report.contact_sheet)
    assert sheet.size == (2 * 160, 160 + 14)
    assert "instance_token is empty" in text


def test_the_guide_balance_and_per_picture_close_ups_without_tags(tmp_path):
    """No tags: the face's share tells close-ups (each one, not only when every picture is one)
    and the framing balance; a picture the detector found no face in is asked about."""
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"full": (200, 400), "close": (200, 200), "noface": (250, 500)}
    sizes.update({f"bust{i}": (300 + 10 * i, 300 + 10 * i) for i in range(4)})
    for name, size in sizes.items():
        figure(size).save(src / f"{name}.png")

    def detector(im):  # the face's share of the height: 0.1 full body, 0.5 close-up, else 0.2 bust-up
        if im.size == sizes["noface"]:
            return []
        side = round(im.height * {sizes["full"]: 0.1, sizes["close"]: 0.5}.get(im.size, 0.2))
        return [(im.width // 2 - side // 2, 10, side, side)]
    detector.name = "hand"
    report = prep(src, tmp_path / "out", face_detector=detector, resolution=128)  # no shrinking
    guide = {f.source: [g.split(":")[0] for g in f.guide] for f in report.files}
    assert guide == {"full.png": [], "close.png": ["face close-up"], "noface.png": ["no face found"],
                     **{f"bust{i}.png": [] for i in range(4)}}
    assert report.balance.startswith("full body : bust-up = 1 : 4 (1 close-up(s), 1 not told) in 7 pictures; "
                                     "the guide: about 3 : 2, 5–10 pictures / 全身 1 : バストアップ 4")
    text = " ".join(report.warnings)
    assert "fewer full-body pictures than the guide's 3 : 2 (here 1 : 4)" in text and "全身の画像を足して" in text
    assert "training pictures: the guide recommends" not in text  # 7 is within 5-10
    assert "balance: full body : bust-up = 1 : 4" in report.summary()
    assert "Balance: full body : bust-up = 1 : 4" in (report.out_dir / "report.md").read_text(encoding="utf-8")


def test_the_guide_balance_advice():
    from collections import Counter

    from dbnb.prep.views import balance_advice

    assert balance_advice(Counter({"full body": 3, "bust": 2, "face": 1}), 3) == []
    few = balance_advice(Counter({"full body": 3, "bust": 1}), 3)
    assert len(few) == 1 and few[0].startswith("4 training pictures: the guide recommends 5–10")
    assert "extra_framings=True" in balance_advice(Counter({"full body": 6}), 3)[0]
    assert balance_advice(Counter({"full body": 1, "bust": 1}), 3) == []  # 2 pictures: said as "only 2" elsewhere


def test_rerun_skips_done_work_and_gives_the_same_output(tmp_path, segmenter):
    calls = []

    def counting(rgb):
        calls.append(rgb.size)
        return segmenter(rgb)

    counting.name = segmenter.name
    src = tmp_path / "src"
    src.mkdir()
    for i, colour in enumerate((RED, BLUE, (200, 0, 200))):
        _red_on_green((200 + 20 * i, 150)).save(src / f"p{i}.png")
    out = tmp_path / "out"
    kw = dict(remove_background=True, segmenter=counting, instance_token="nanU", class_token="Unan")

    def snapshot():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and p.name not in ("prep_report.json", "report.md")}

    first = prep(src, out, **kw)
    files1 = snapshot()
    assert len(calls) == 3 and {f.status for f in first.files} == {"prepared"}
    second = prep(src, out, **kw)
    assert len(calls) == 3 and {f.status for f in second.files} == {"unchanged"}
    assert snapshot() == files1

    name = next(iter(first.files[0].outputs))
    (out / name).with_suffix(".txt").write_text("nanU Unan, holding a fan\n")  # edited in the notebook
    (src / "p2.png").unlink()
    third = prep(src, out, **kw)
    assert caption_for(out / name) == "nanU Unan, holding a fan"
    assert "edited by hand were kept" in " ".join(third.warnings)
    gone = next(iter(first.files[2].outputs))
    assert not (out / gone).exists() and not (out / gone).with_suffix(".txt").exists()

    prep(src, out, **{**kw, "background_color": "black"})
    assert len(calls) == 5  # a changed setting redoes the pictures

    figure().save(out / "stray.png")  # put there by hand: the trainer would learn it too
    assert "prep did not write" in " ".join(prep(src, out, **kw).warnings)


def test_config_defaults_and_setting_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    figure().save(src / "a.png")
    cfg = Config(dataset_source=str(src), instance_data_dir=str(tmp_path / "ready"), remove_background=False,
                 resolution=64)
    report = prepare_dataset(cfg, progress=False, face_detector=None)
    assert report.out_dir == tmp_path / "ready" and len(report.images) == 1
    assert (tmp_path / "ready" / "prep_report.json").is_file()
    with pytest.raises(PrepError, match="dataset_source"):
        prepare_dataset(Config(instance_data_dir="x"), progress=False)
    with pytest.raises(PrepError, match="instance_data_dir"):
        prepare_dataset(Config(dataset_source=str(src)), progress=False)
    with pytest.raises(PrepError, match="same folder"):
        prep(src, src)
    with pytest.raises(PrepError, match="does not exist"):
        prep(tmp_path / "nope", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_output_inside_the_source_folder_is_not_read_back(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    figure().save(src / "a.png")
    prep(src, src / "prepared")
    report = prep(src, src / "prepared")
    assert [f.source for f in report.files] == ["a.png"]


def test_animeface_detector_runs_offline():
    animeface = pytest.importorskip("animeface")
    from dbnb.prep import animeface_detector

    detect = animeface_detector()
    assert detect is not None and detect(Image.new("RGB", (64, 64), WHITE)) == []
    assert animeface.__name__ == "animeface"


# --- notebook widgets ----------------------------------------------------------------------------

def test_upload_and_caption_editor(tmp_path):
    from dbnb.data.intake import save_uploads
    from dbnb.faces.widgets import caption_editor

    buf = io.BytesIO()
    figure().save(buf, "PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("set/b.png", buf.getvalue())
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../x.png", buf.getvalue())
    placed, problems = save_uploads([{"name": "a.png", "content": memoryview(buf.getvalue())},
                                     {"name": "set.zip", "content": archive.getvalue()},
                                     {"name": "evil.zip", "content": evil.getvalue()},
                                     {"name": "doc.pdf", "content": b"x"}], tmp_path / "up")
    assert sorted(p.relative_to(tmp_path / "up").as_posix() for p in placed) == ["a.png", "set/set/b.png"]
    assert any("evil.zip" in p and "'../x.png'" in p for p in problems) and any("doc.pdf" in p for p in problems)
    assert not (tmp_path / "x.png").exists()

    report = prep(tmp_path / "up", tmp_path / "out", instance_token="nanU")
    editor = caption_editor(tmp_path / "out")
    first = editor.children[1]  # children[0]: the bulk tag row
    text, save = first.children[1].children[1], first.children[1].children[2]
    assert text.value == caption_for(report.images[0])
    text.value = "nanU girl,  waving"
    save.click()
    assert caption_for(report.images[0]) == "nanU girl, waving"


def test_keep_alpha_writes_the_cut_out_with_transparent_padding(tmp_path, segmenter):
    src = tmp_path / "src"
    src.mkdir()
    cut = Image.new("RGBA", (40, 80), (0, 0, 0, 0))
    ImageDraw.Draw(cut).rectangle((10, 10, 30, 70), fill=(0, 0, 255, 255))
    cut.save(src / "cut.png")
    _red_on_green().save(src / "seg.png")
    report = prep(src, tmp_path / "out", keep_alpha=True, remove_background=True, segmenter=segmenter)
    row = {f.source: f for f in report.files}
    out = Image.open(tmp_path / "out" / next(iter(row["cut.png"].outputs)))
    assert out.mode == "RGBA" and out.size == (64, 64)
    assert px(out, (2, 32))[3] == 0 and px(out, (32, 2))[3] == 0  # padding and background: transparent
    assert px(out, (32, 32)) == pytest.approx((0, 0, 255, 255), abs=3)
    seg = Image.open(tmp_path / "out" / next(iter(row["seg.png"].outputs)))
    # 300x150 padded to 300² (picture at y 75-225), scaled by 64/300: the red box stays, green goes
    assert seg.mode == "RGBA" and px(seg, (12, 32))[3] > 250 and px(seg, (50, 32))[3] < 5
    assert "alpha kept" in row["seg.png"].done
    flat = prep(src, tmp_path / "flat", remove_background=True, segmenter=segmenter)
    assert {Image.open(p).mode for p in flat.images} == {"RGB"}  # off: composited, as before
    assert Image.open(report.contact_sheet).convert("RGB").getpixel((5, 5)) == (255, 255, 255)  # not black


def test_caption_editor_removes_and_adds_a_tag_everywhere(tmp_path):
    from dbnb.faces.widgets import caption_editor

    for i, tags in enumerate(("nanU, 1girl, white background, smile", "nanU, white background", "nanU, solo")):
        figure(body=(i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(tags + "\n")
    editor = caption_editor(tmp_path)
    tag, remove, add, status = editor.children[0].children
    tag.value = "white background"
    remove.click()
    assert [caption_for(tmp_path / f"{i}.png") for i in range(3)] == ["nanU, 1girl, smile", "nanU", "nanU, solo"]
    assert status.value == "removed from 2 caption(s)"
    assert editor.children[1].children[1].children[1].value == "nanU, 1girl, smile"  # the boxes show it
    tag.value = "school uniform"
    add.click()
    assert [caption_for(tmp_path / f"{i}.png") for i in range(3)] == [
        "nanU, school uniform, 1girl, smile", "nanU, school uniform", "nanU, school uniform, solo"]
    add.click()  # already there: nothing doubles
    assert status.value == "added to 0 caption(s)"


def test_cli_prep_takes_a_google_drive_link(tmp_path, drive, capsys):
    from dbnb.faces.cli import main

    good = io.BytesIO()
    figure().save(good, "PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("chara/a.png", good.getvalue())
        zf.writestr("chara/front/b.png", good.getvalue()[:-1] + b"x")
    link = drive.file("chara.zip", archive.getvalue())  # the case: a shared file's link
    assert main(["prep", link, str(tmp_path / "out"), "remove_background=false", "resolution=64"]) == 0
    assert "2 training pictures" in capsys.readouterr().out
    assert main(["prep", "https://drive.google.com/drive/folders/1NotSharedFolder0000000000000",
                 str(tmp_path / "out2"), "remove_background=false"]) == 2
    assert "anyone with the link" in capsys.readouterr().err and not (tmp_path / "out2").exists()
