"""`xraygan review`: the reader page over HTTP, resume, no key in any response, several readers."""

import csv
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import xray_like

from xraygan.audit import AuditConfig, audit, cohen_kappa, fleiss_kappa, score_readers
from xraygan.errors import InputError
from xraygan.images import save_png
from xraygan.review import PAGE, ReviewConfig, make_server, reader_order


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rev")
    rng = np.random.default_rng(0)
    for name in ("real", "synth"):
        for i in range(16):
            save_png(root / name / "pneumonia" / f"{name}-{i:03d}.png", xray_like(rng, 32, bright=name == "synth"))
    audit(AuditConfig(real=root / "real", synthetic=root / "synth", out=root / "audit", classifier="none",
                      review=12, device="cpu", kid_subset_size=10))
    return root / "audit"


class Served:
    """A review server on a free port, in a thread; every response body is kept for inspection."""

    def __init__(self, audit: Path, reader: str = "ana"):
        self.server = make_server(ReviewConfig(audit=audit, reader=reader, port=0))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.bodies: list[bytes] = []
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read()
        self.bodies.append(body)
        return body

    def post(self, obj: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + "/api/answer", data=json.dumps(obj).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body, code = r.read(), r.status
        except urllib.error.HTTPError as e:
            body, code = e.read(), e.code
        self.bodies.append(body)
        return code, json.loads(body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def key_of(audit: Path) -> dict:
    return json.loads((audit / "review_key.json").read_text())["items"]


def test_answers_are_kept_across_a_restart_and_the_key_never_leaves(audit_dir, tmp_path):
    audit = tmp_path / "audit"
    shutil.copytree(audit_dir, audit)
    key = key_of(audit)
    s = Served(audit)
    try:
        page = s.get("/")
        state = json.loads(s.get("/api/state"))
        assert state["position"] == 0 and len(state["order"]) == 12
        assert b"synthetic" not in s.bodies[-1]  # nothing answered yet: the state names no class
        for rid in state["order"]:
            s.get(f"/img/{rid}.png")
        first = state["order"][:3]
        for rid, g in zip(first, ("real", "synthetic", "real")):
            code, res = s.post({"id": rid, "guess": g, "quality": "4", "comment": "rib  edge\nblurred"})
            assert code == 200 and res["ok"]
        assert s.post({"id": "IMG999", "guess": "real"})[0] == 400
        assert s.post({"id": first[0], "guess": "maybe"})[0] == 400
        assert s.post({"id": first[0], "guess": "real", "quality": "9"})[0] == 400
    finally:
        s.stop()
    rows = {r["id"]: r for r in csv.DictReader(open(audit / "review" / "ana.csv"))}
    assert [rows[r]["guess"] for r in first] == ["real", "synthetic", "real"]
    assert rows[first[0]]["comment"] == "rib edge blurred" and rows[first[0]]["quality"] == "4"
    bodies = s.bodies
    s = Served(audit)  # restarted: the answers and the position are back
    try:
        state = json.loads(s.get("/api/state"))
        assert state["position"] == 3 and state["answers"][first[1]]["guess"] == "synthetic"
    finally:
        s.stop()
    bodies += s.bodies
    # the key is in no response: not the true files, not which images are synthetic
    assert page == PAGE.read_bytes()  # the page is the same static file whatever the key
    names = {Path(v["file"]).name.encode() for v in key.values()} | {v["file"].encode() for v in key.values()}
    for body in bodies:
        assert not [n for n in names if n in body]
        assert b"truth" not in body and b"review_key" not in body
    files = {(audit / "review" / "images" / f"{rid}.png").read_bytes() for rid in state["order"]}
    assert files <= set(bodies)  # each image is sent as the review file itself, nothing added


def test_order_is_per_reader_and_stable():
    ids = [f"IMG{i:03d}" for i in range(1, 41)]
    a, b = reader_order(ids, "ana"), reader_order(ids, "ben")
    assert a == reader_order(ids, "ana") and a != b and sorted(a) == ids


def test_refusals(audit_dir):
    with pytest.raises(InputError, match="--reader"):
        make_server(ReviewConfig(audit=audit_dir, reader="../x", port=0))
    with pytest.raises(InputError, match="not 'review'"):
        make_server(ReviewConfig(audit=audit_dir, reader="review", port=0))
    with pytest.raises(InputError, match="no review/images"):
        make_server(ReviewConfig(audit=audit_dir / "review", port=0))


def test_kappa_hand_examples():
    # 10 images: both real 4, both synthetic 3, A real / B synthetic 2, A synthetic / B real 1
    a = ["r"] * 4 + ["s"] * 3 + ["r"] * 2 + ["s"]
    b = ["r"] * 4 + ["s"] * 3 + ["s"] * 2 + ["r"]
    # p_o = 0.7; A 6 r / 4 s, B 5 / 5: p_e = 0.6·0.5 + 0.4·0.5 = 0.5; κ = 0.2 / 0.5
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # 3 readers, 4 images with (real, synthetic) counts (3,0) (0,3) (2,1) (1,2):
    # P_i = 1, 1, 1/3, 1/3 → P̄ = 2/3; p_real = 6/12 → P_e = 0.5; κ = (2/3 − 1/2) / (1/2) = 1/3
    rows = [["r", "r", "r"], ["s", "s", "s"], ["r", "r", "s"], ["r", "s", "s"]]
    assert fleiss_kappa(rows) == pytest.approx(1 / 3)
    assert fleiss_kappa([[x, y] for x, y in zip(a, b)]) == pytest.approx(cohen_kappa(a, b), abs=0.05)


def test_several_readers_scored_with_agreement(audit_dir, tmp_path):
    audit = tmp_path / "audit"
    shutil.copytree(audit_dir, audit)
    key = key_of(audit)
    ids = sorted(key)
    for name, wrong in (("ana", 0), ("ben", 3)):  # ana perfect; ben wrong on the first three
        with open(audit / "review" / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "guess", "quality", "comment"])
            for i, rid in enumerate(ids):
                t = key[rid]["truth"]
                g = t if i >= wrong else ("real" if t == "synthetic" else "synthetic")
                w.writerow([rid, g, 5 if t == "real" else 2, ""])
    res = score_readers([audit / "review"])
    assert set(res["readers"]) == {"ana", "ben"}
    assert res["readers"]["ana"]["accuracy"] == 1.0 and res["readers"]["ben"]["accuracy"] == pytest.approx(0.75)
    assert res["pooled"]["answered"] == 24 and res["pooled"]["accuracy"] == pytest.approx(21 / 24)
    assert res["readers"]["ana"]["mean_quality"] == {"real": 5.0, "synthetic": 2.0}
    truth = [key[r]["truth"] for r in ids]
    ben = [("real" if t == "synthetic" else "synthetic") if i < 3 else t for i, t in enumerate(truth)]
    assert res["agreement"]["statistic"] == "cohen_kappa"
    assert res["agreement"]["kappa"] == pytest.approx(cohen_kappa(truth, ben), abs=1e-4)
    report = (audit / "report.md").read_text()
    assert report.count("## Reader study") == 1 and "| ana | 12 | 1.000 |" in report
    score_readers([audit / "review" / "ana.csv", audit / "review" / "ben.csv"])  # again: replaced, not added
    assert (audit / "report.md").read_text().count("## Reader study") == 1
    from typer.testing import CliRunner

    from xraygan.cli import app

    r = CliRunner().invoke(app, ["score-review", str(audit / "review"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["readers"]["ben"]["accuracy"] == pytest.approx(0.75) and "| ben | 12 |" in r.stderr
    old = CliRunner().invoke(app, ["audit", "--score-review", str(audit / "review"), "--json"])
    assert json.loads(old.stdout)["pooled"] == json.loads(r.stdout)["pooled"] and "is now `xraygan score-review" in old.stderr


def _browser():
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return pw, exe


def test_a_real_browser_answers_with_the_keyboard(audit_dir, tmp_path):
    pw, exe = _browser()
    audit = tmp_path / "audit"
    shutil.copytree(audit_dir, audit)
    s = Served(audit, reader="cy")
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 800})
            page.goto(s.url + "/")
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('0 / 12')")
            order = json.loads(s.get("/api/state"))["order"]
            page.keyboard.press("r")
            page.keyboard.press("4")  # guess and rating given: on to the next image
            page.wait_for_function("document.getElementById('pos').textContent === 'image 2 of 12'")
            page.keyboard.press("s")
            page.keyboard.press("2")
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('2 / 12')")
            page.keyboard.press("ArrowLeft")
            page.wait_for_function("document.getElementById('pos').textContent === 'image 2 of 12'")
            page.keyboard.press("+")
            page.fill("#note", "looks smooth")
            page.keyboard.press("Tab")  # the note is saved when it loses focus
            page.wait_for_timeout(300)
            browser.close()
    finally:
        s.stop()
    rows = {r["id"]: r for r in csv.DictReader(open(audit / "review" / "cy.csv"))}
    assert (rows[order[0]]["guess"], rows[order[0]]["quality"]) == ("real", "4")
    assert (rows[order[1]]["guess"], rows[order[1]]["quality"], rows[order[1]]["comment"]) == (
        "synthetic", "2", "looks smooth")
    assert sum(1 for r in rows.values() if r["guess"]) == 2
