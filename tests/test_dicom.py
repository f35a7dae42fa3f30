"""DICOM input: the grayscale pipeline, refusals, views, patients and privacy."""

import json
from pathlib import Path

import numpy as np
import pytest
from dicomfix import SECRETS, real_images, write_dicom

from xraygan.dicom import DicomSkip, is_dicom_file, read_dicom
from xraygan.prepare import PrepareConfig, prepare
from xraygan.sources import patient_id

pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    return real_images(1)[0]


def test_monochrome1_reads_as_its_monochrome2_twin(tmp_path, img):
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", img), 64).pixels
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", img, photometric="MONOCHROME1"), 64).pixels
    assert np.array_equal(m1, m2)
    # bone bright: the 12-bit image's own range maps back onto the 8-bit original
    own = (img.astype(float) - img.min()) * 255 / (img.max() - img.min())
    assert np.abs(m2.astype(float) - own).max() <= 1.0


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_any_bit_depth_to_8_bit(tmp_path, img, bits):
    a = read_dicom(write_dicom(tmp_path / "x.dcm", img, bits=bits), 64).pixels
    own = (img.astype(float) - img.min()) * 255 / (img.max() - img.min())
    assert a.dtype == np.uint8 and a.shape == (64, 64)
    assert np.abs(a.astype(float) - own).max() <= 1.0


def test_rescale_then_window_applied(tmp_path, img):
    v = img.astype(np.int64) * 16  # the displayed value the modality LUT must give back
    stored = ((v + 1024) // 2).astype(np.uint16)  # slope 2, intercept -1024
    c, w = 1500.0, 1200.0
    a = read_dicom(write_dicom(tmp_path / "w.dcm", img, stored=stored, slope=2, intercept=-1024,
                               window=(c, w)), 64).pixels
    # PS3.3 C.11.2.1.2.1, computed here independently of the module
    expect = np.clip(((v - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
    assert np.abs(a.astype(float) - expect).max() <= 0.51
    assert (a == 0).any() and (a == 255).any()  # the window clips both ends of this image
    # without the window the same file shows its own range instead: different pixels
    b = read_dicom(write_dicom(tmp_path / "nw.dcm", img, stored=stored, slope=2, intercept=-1024), 64).pixels
    assert not np.array_equal(a, b)


def test_resized_to_the_requested_size(tmp_path, img):
    big = np.kron(img, np.ones((8, 8), np.uint8))  # 512 px
    a = read_dicom(write_dicom(tmp_path / "big.dcm", big), 128).pixels
    assert a.shape == (128, 128)


def test_refusals_name_the_reason(tmp_path, img):
    with pytest.raises(ValueError, match="multi-frame DICOM \\(3 frames\\)"):
        read_dicom(write_dicom(tmp_path / "mf.dcm", img, frames=3), 64)
    with pytest.raises(ValueError, match="colour DICOM \\(RGB"):
        read_dicom(write_dicom(tmp_path / "rgb.dcm", img, bits=8, rgb=True), 64)
    with pytest.raises(ValueError, match="without pixel data"):
        read_dicom(write_dicom(tmp_path / "sr.dcm", img, pixels=False), 64)
    bad = tmp_path / "trunc.dcm"
    bad.write_bytes(write_dicom(tmp_path / "ok.dcm", img).read_bytes()[:2000])
    with pytest.raises(ValueError):
        read_dicom(bad, 64)
    (tmp_path / "text.dcm").write_text("hello")
    with pytest.raises(ValueError, match="not a DICOM file"):
        read_dicom(tmp_path / "text.dcm", 64)


def test_lateral_skipped_by_default_and_views_option(tmp_path, img):
    lat = write_dicom(tmp_path / "lat.dcm", img, view="LL")
    with pytest.raises(DicomSkip) as e:
        read_dicom(lat, 64)
    assert e.value.view == "LATERAL"
    ap = write_dicom(tmp_path / "ap.dcm", img, view="AP")
    none = write_dicom(tmp_path / "none.dcm", img, view="")
    assert read_dicom(ap, 64, views=("PA", "AP")).view == "AP"
    assert read_dicom(none, 64).view == ""  # default: kept
    with pytest.raises(DicomSkip):
        read_dicom(none, 64, views=("PA", "AP"))  # an explicit list needs the view to be shown


def test_compressed_read_or_refused_with_the_package(tmp_path, img):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder
    from pydicom.uid import JPEG2000Lossless

    plain = write_dicom(tmp_path / "plain.dcm", img)
    ds = pydicom.dcmread(plain)
    try:
        ds.compress(JPEG2000Lossless)
    except (RuntimeError, ValueError):
        pytest.skip("no JPEG 2000 encoder installed (pip install 'xraygan[dicom]')")
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    assert np.array_equal(read_dicom(tmp_path / "j2k.dcm", 64).pixels, read_dicom(plain, 64).pixels)
    saved = dict(JPEG2000LosslessDecoder._available)  # as if no decoder were installed
    JPEG2000LosslessDecoder._available.clear()
    try:
        with pytest.raises(ValueError) as e:
            read_dicom(tmp_path / "j2k.dcm", 64)
    finally:
        JPEG2000LosslessDecoder._available.update(saved)
    assert "pip install pylibjpeg-openjpeg" in str(e.value) and "\n" not in str(e.value)


def test_dicom_detected_without_extension(tmp_path, img):
    f = write_dicom(tmp_path / "IM000123", img)
    g = write_dicom(tmp_path / "1.2.840.113619.2.55", img)
    (tmp_path / "README").write_text("not dicom")
    assert is_dicom_file(f) and is_dicom_file(g) and not is_dicom_file(tmp_path / "README")


def make_dicom_tree(root: Path, n_patients: int = 10, per_patient: int = 4) -> dict[str, str]:
    """SRC/<class>/<patient folder>/<file> DICOMs (half extension-less, half MONOCHROME1), a
    lateral view and an SR per class; returns file name → PatientID."""
    owner = {}
    for cls, label in (("normal", 0), ("pneumonia", 1)):
        imgs = real_images(n_patients * per_patient, label)
        for i, a in enumerate(imgs):
            pid = f"{cls[:2].upper()}{i // per_patient:05d}"
            name = f"IM{i:06d}" if i % 2 else f"{i:06d}.dcm"
            write_dicom(root / cls / f"study-{i // per_patient}" / name, a, patient=pid,
                        photometric="MONOCHROME1" if i % 3 == 0 else "MONOCHROME2", view="PA" if i % 2 else "AP")
            owner[name] = pid
        write_dicom(root / cls / "lateral.dcm", imgs[0], patient="LAT01", view="LATERAL")
        write_dicom(root / cls / "report.dcm", imgs[0], patient="SR01", pixels=False)
    return owner


def test_prepare_dicom_tree_by_patient_and_private(tmp_path):
    src = tmp_path / "pacs"
    make_dicom_tree(src)
    out = tmp_path / "data"
    rec = prepare(PrepareConfig(out=out, src=src, size=32, workers=1, split=(0.6, 0.2, 0.2)))
    assert sum(sum(c.values()) for c in rec["counts"].values()) == 80
    assert rec["views_skipped"] == {"LATERAL": 2}
    assert rec["skipped_count"] == 2 and all("without pixel data" in s["reason"] for s in rec["skipped"])
    assert rec["dicom"]["images"] == 80
    # patients never straddle splits: the name's first half is the patient hash
    where: dict[str, set] = {}
    for p in out.glob("*/*/*.png"):
        where.setdefault(p.stem.split("-")[0], set()).add(p.parts[-3])
    assert len(where) == 20 and all(len(s) == 1 for s in where.values())
    # no header value, file name or folder name of the source in any output file
    secrets = set(SECRETS.values()) | {"NO00001", "PN00003", "IM000001", "000000", "study-", "LAT01", "SR01"}
    for f in out.rglob("*"):
        if f.is_file():
            text = f.name + (f.read_text() if f.suffix == ".json" else f.read_bytes().decode("latin-1"))
            assert not [s for s in secrets if s in text], f
    assert all(s["file"].startswith("dicom:file-") for s in rec["skipped"])
    assert len(rec["skipped_local"]) == 2 and "report.dcm" in rec["skipped_local"][0]["file"]
    # the same source gives the same names; --salt changes them
    rec2 = prepare(PrepareConfig(out=tmp_path / "again", src=src, size=32, workers=1, split=(0.6, 0.2, 0.2)))
    assert sorted(p.name for p in out.glob("*/*/*.png")) == sorted(p.name for p in (tmp_path / "again").glob("*/*/*.png"))
    assert rec2["counts"] == rec["counts"]
    prepare(PrepareConfig(out=tmp_path / "salted", src=src, size=32, workers=1, salt="s3cret"))
    assert not {p.name for p in out.glob("*/*/*.png")} & {p.name for p in (tmp_path / "salted").glob("*/*/*.png")}
    assert "s3cret" not in (tmp_path / "salted" / "dataset.json").read_text()


def test_prepare_dicom_in_worker_processes_matches_one_process(tmp_path):
    src = tmp_path / "pacs"
    make_dicom_tree(src, n_patients=12)
    one = prepare(PrepareConfig(out=tmp_path / "one", src=src, size=32, workers=1))
    two = prepare(PrepareConfig(out=tmp_path / "two", src=src, size=32, workers=2))
    assert one["counts"] == two["counts"]
    a = sorted((tmp_path / "one").glob("*/*/*.png"))
    b = sorted((tmp_path / "two").glob("*/*/*.png"))
    assert [p.relative_to(tmp_path / "one") for p in a] == [p.relative_to(tmp_path / "two") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert not list((tmp_path / "two").rglob(".decoded"))


def test_no_patient_id_falls_back_to_the_file(tmp_path):
    src = tmp_path / "src"
    for cls, label in (("normal", 0), ("pneumonia", 1)):
        for i, a in enumerate(real_images(10, label)):
            write_dicom(src / cls / f"x{i}.dcm", a, patient=None)
    rec = prepare(PrepareConfig(out=tmp_path / "d", src=src, size=32, workers=1, split=(0.6, 0.2, 0.2)))
    assert sum(sum(c.values()) for c in rec["counts"].values()) == 20
    assert patient_id("x1") is None
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["dicom"]["images"] == 20
