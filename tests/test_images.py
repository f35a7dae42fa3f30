import io

import numpy as np
import pytest
from conftest import make_folder
from PIL import Image

from xraygan.errors import InputError
from xraygan.images import load_gray, make_square, read_image_folder, save_png, to_gray8


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_uses_luma():
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    assert to_gray8(img)[0, 0] == 76  # 0.299 * 255


def test_rgba_composited_on_black_not_raw_colour():
    img = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # fully transparent white
    assert to_gray8(img).max() == 0
    img = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert to_gray8(img).min() == 255


def test_palette_image():
    img = Image.new("P", (8, 8))
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    a = to_gray8(img)
    assert a[0, 0] == 29 and a[1, 1] == 0  # pure blue → 0.114 * 255


def test_16bit_stretched_not_clipped():
    a16 = np.linspace(1000, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    png = _bytes(Image.fromarray(a16), "PNG")
    out = load_gray(png, 64)
    assert out.min() == 0 and out.max() == 255  # PIL's convert("L") would give all 255
    assert np.all(np.diff(out.reshape(-1).astype(int)) >= 0)


def test_exif_rotation_applied():
    a = np.zeros((40, 80), np.uint8)
    a[:, :40] = 255  # left half white, landscape
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = _bytes(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_gray(data, 40, square="pad")
    # displayed portrait: the white half is on top
    assert out[5, 20] > 200 and out[35, 20] < 50


def test_resize_is_antialiased():
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    out = load_gray(_bytes(Image.fromarray(checker), "PNG"), 16)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 3  # aliasing would give stripes


def test_large_jpeg_draft_matches_full_decode():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1200, 0:1000] / 1000
    a = (128 + 100 * np.sin(8 * x) * np.cos(6 * y) + rng.normal(0, 5, x.shape)).clip(0, 255)
    data = _bytes(Image.fromarray(a.astype(np.uint8)), "JPEG", quality=90)
    fast = load_gray(data, 64).astype(int)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    ref = np.asarray(Image.fromarray(make_square(full, "crop")).resize((64, 64), Image.LANCZOS)).astype(int)
    assert np.abs(fast - ref).mean() < 2.0


@pytest.mark.parametrize("data,reason", [
    (b"this is not an image", "not an image"),
    (b"", "not an image"),
])
def test_non_image_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        load_gray(data, 16)


def test_truncated_jpeg_reason():
    data = _bytes(Image.fromarray(np.full((64, 64), 100, np.uint8)), "JPEG")
    with pytest.raises(ValueError, match="truncated|broken|image"):
        load_gray(data[: len(data) // 2], 16)


def test_square_modes():
    a = np.ones((10, 20), np.uint8)
    assert make_square(a, "crop").shape == (10, 10)
    p = make_square(a, "pad")
    assert p.shape == (20, 20) and p[0, 0] == 0 and p[10, 10] == 1


def test_read_image_folder_errors(tmp_path):
    for c in ("normal", "pneumonia"):
        save_png(tmp_path / c / "a.png", np.zeros((16, 16), np.uint8))
    f = read_image_folder(tmp_path)
    assert f.classes == ("normal", "pneumonia") and f.images.shape == (2, 16, 16)
    save_png(tmp_path / "pneumonia" / "b.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match=r"b\.png: image is 8 px"):
        read_image_folder(tmp_path)
    with pytest.raises(InputError, match="unknown class"):
        read_image_folder(tmp_path, classes=("normal",))
    with pytest.raises(InputError, match="folder not found"):
        read_image_folder(tmp_path / "nope")


def test_big_folder_goes_to_a_memory_map_with_the_same_pixels(tmp_path, rng, monkeypatch):
    import xraygan.images as images

    make_folder(tmp_path / "d", {"normal": 700, "pneumonia": 400}, 16, rng)
    in_ram = read_image_folder(tmp_path / "d")
    assert type(in_ram.images) is np.ndarray
    monkeypatch.setattr(images, "MEMMAP_OVER", 1000)
    mapped = read_image_folder(tmp_path / "d")
    assert isinstance(mapped.images, np.memmap)
    assert np.array_equal(mapped.images, in_ram.images) and np.array_equal(mapped.labels, in_ram.labels)
    assert mapped.files == in_ram.files and mapped.labels[699] == 0 and mapped.labels[700] == 1
    # read in chunks on threads, in file order: each image where its file is
    assert np.array_equal(in_ram.images[1000], np.asarray(Image.open(in_ram.files[1000])))


def test_odd_sized_image_in_a_big_folder_is_named(tmp_path, rng):
    make_folder(tmp_path / "d", {"normal": 600, "pneumonia": 600}, 16, rng)
    save_png(tmp_path / "d" / "pneumonia" / "pneumonia-550.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(InputError, match="pneumonia-550.png: image is 20 px, the others are 16 px"):
        read_image_folder(tmp_path / "d")
