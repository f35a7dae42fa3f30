"""DICOM files for tests, written with pydicom from real Kermany X-rays (the shipped sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Header values that must never reach an output: every file made here carries them.
SECRETS = {"PatientName": "DOE^JANE^Q", "AccessionNumber": "ACC7731904", "StudyDate": "20190417",
           "InstitutionName": "Saint Example Hospital", "PatientBirthDate": "20150102"}


def real_images(n: int, cls: int = 0) -> np.ndarray:
    """n real 64 px chest X-rays of one class (0 normal, 1 pneumonia) from the shipped sample."""
    from xraygan.sample import load_sample

    sp = load_sample()[0]["train"]
    return sp.images[sp.labels == cls][:n]


def write_dicom(path: Path, img8: np.ndarray, *, patient: str | None = "PAT-0001", view: str = "PA",
                bits: int = 12, photometric: str = "MONOCHROME2", slope: float | None = None,
                intercept: float | None = None, window: tuple[float, float] | None = None,
                stored: np.ndarray | None = None, pixels: bool = True, frames: int = 1,
                rgb: bool = False, uid: str | None = None, preamble: bool = True) -> Path:
    """One DX image. By default the 8-bit image is stored at `bits` bits (v = img·(2^bits−1)/255),
    inverted for MONOCHROME1; `stored` gives the stored values directly."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    top = 2 ** bits - 1
    if stored is None:
        stored = np.rint(img8.astype(np.float64) * top / 255).astype(np.uint16)
        if photometric == "MONOCHROME1":
            stored = (top - stored).astype(np.uint16)
    uid = uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    if patient is not None:
        ds.PatientID = patient
    for k, v in SECRETS.items():
        setattr(ds, k, v)
    if view:
        ds.ViewPosition = view
    if pixels:
        ds.Rows, ds.Columns = stored.shape[-2:]
        ds.SamplesPerPixel = 3 if rgb else 1
        ds.PhotometricInterpretation = "RGB" if rgb else photometric
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
        data = stored.astype(np.uint16 if bits > 8 else np.uint8)
        if rgb:
            ds.PlanarConfiguration = 0
            data = np.repeat(data[..., None], 3, axis=-1)
        if frames > 1:
            ds.NumberOfFrames = frames
            data = np.stack([data] * frames)
        ds.PixelData = data.tobytes()
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0, "US"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path
