"""Where each image came from: the per-file source records that `prepare` and `rebalance` write,
read back for any image folder they made (`DATA/test`, `BALANCED/`)."""

from __future__ import annotations

from pathlib import Path

from xraygan.fsutil import read_json


def file_sources(folder: Path) -> dict[str, str] | None:
    """`{"<class>/<file>": source}` for the images of `folder`, or None when its record names a
    single source (or there is no record). A split folder reads its parent's dataset.json; a
    rebalanced folder its rebalance.json."""
    folder = Path(folder)
    if (folder / "rebalance.json").is_file():
        m = read_json(folder / "rebalance.json").get("file_sources")
        return m if m and len(set(m.values())) > 1 else None
    rec_path = folder.parent / "dataset.json"
    if not rec_path.is_file():
        return None
    m = read_json(rec_path).get("file_sources")
    if not m:
        return None
    prefix = folder.name + "/"
    mine = {k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}
    return mine if len(set(mine.values())) > 1 else None


def single_source(folder: Path) -> str:
    """The source name of a folder whose images all come from one source ('unknown' without a record)."""
    folder = Path(folder)
    rec_path = folder.parent / "dataset.json"
    if rec_path.is_file():
        srcs = read_json(rec_path).get("sources") or []
        if len(srcs) == 1:
            return {"split": "kermany", "folder": "folder"}.get(srcs[0].get("kind"), srcs[0].get("kind", "unknown"))
    return "unknown"


def generators_behind(folder: Path) -> list[dict] | None:
    """The generators whose images a training folder holds, as `rebalance` recorded them
    (checkpoint path and sha256); [] for a folder rebalanced without synthetic images or with
    images no generate record names, None for a folder rebalance did not write (or a record from
    before it said)."""
    path = Path(folder) / "rebalance.json"
    if not path.is_file():
        return None
    gens = read_json(path).get("generators")
    if gens is None:
        return None
    seen: dict[str, dict] = {}
    for g in gens:
        seen.setdefault(generator_key(g), {"checkpoint": g.get("checkpoint"),
                                          "checkpoint_sha256": g.get("checkpoint_sha256")})
    return list(seen.values())


def generator_key(g: dict) -> str:
    """What tells one recorded generator from another: its checkpoint's sha256, else its path."""
    return g.get("checkpoint_sha256") or g.get("checkpoint") or ""
