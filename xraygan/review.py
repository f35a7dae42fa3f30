"""`xraygan review AUDIT`: the blinded real-vs-synthetic reading as a local web page.

The page shows the audit's review images (`AUDIT/review/images/IMGnnn.png`, neutral ids) one at
a time at full size on a dark background, with zoom and window/level, and asks "real or
synthetic?" and a realism rating 1-5 (and an optional note). Every answer is written at once,
atomically, to `AUDIT/review/<reader>.csv` in the layout `xraygan score-review` reads, so
closing the browser or stopping the server loses nothing, and the next start resumes at the
first unanswered image. Each reader gets their own order (shuffled, seeded by the name).

The server never opens `review_key.json`: nothing it sends can carry the key. It is the
standard library's `ThreadingHTTPServer` (one reader, a few requests a minute: a framework would
add a dependency and no safety), serving one page of plain HTML and JavaScript with nothing
fetched from elsewhere, on the loopback address unless `--host` says otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import json
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from xraygan.errors import InputError
from xraygan.fsutil import atomic_write_text, csv_text
from xraygan.options import opt

FIELDS = ("id", "guess", "quality", "comment")
GUESSES = ("real", "synthetic")
_ID = re.compile(r"^IMG\d{3,6}$")
_READER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
PAGE = Path(__file__).parent / "data" / "review.html"


@dataclass(frozen=True)
class ReviewConfig:
    audit: Path = opt(help="An audit folder with a blinded review sheet (xraygan audit --review N).",
                      argument=True, metavar="AUDIT", show_default=False)
    reader: str = opt("reader1", "The reader's name: their answers go to AUDIT/review/<reader>.csv and their "
                                 "order is shuffled by it.")
    port: int = opt(8000, "Port to listen on (0: any free port).")
    host: str = opt("127.0.0.1", "Address to listen on (this machine only by default). Any other address lets "
                                 "other machines see the images.")

    def validate(self) -> None:
        if not _READER.match(self.reader) or self.reader.lower() == "review":
            raise InputError(f"--reader {self.reader!r}: letters, digits, - and _ (up to 40), not 'review' "
                             "(review.csv is the blank sheet)")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port {self.port}: must be between 0 and 65535")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def review_ids(audit: Path) -> list[str]:
    """The blinded images of an audit folder, by id."""
    images = Path(audit) / "review" / "images"
    if not images.is_dir():
        raise InputError(f"{audit}: no review/images/ (make the sheet with xraygan audit ... --review 40)")
    ids = sorted(p.stem for p in images.glob("*.png") if _ID.match(p.stem))
    if not ids:
        raise InputError(f"{images}: no review images (IMGnnn.png)")
    return ids


def reader_order(ids: list[str], reader: str) -> list[str]:
    """The reader's own order: a shuffle seeded by the name (the same name, the same order)."""
    seed = int.from_bytes(hashlib.blake2b(reader.encode("utf-8"), digest_size=8).digest(), "big")
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]


class Answers:
    """One reader's answers, kept in `AUDIT/review/<reader>.csv`, rewritten whole after each change."""

    def __init__(self, path: Path, ids: list[str]):
        self.path, self.ids = Path(path), ids
        self.lock = threading.Lock()
        self.rows: dict[str, dict[str, str]] = {i: {"guess": "", "quality": "", "comment": ""} for i in ids}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"{self.path}: cannot read the answers kept there ({e})") from None
        for r in rows:
            rid = (r.get("id") or "").strip()
            if rid in self.rows:
                self.rows[rid] = {k: (r.get(k) or "").strip() for k in FIELDS[1:]}

    def answered(self) -> int:
        return sum(1 for r in self.rows.values() if r["guess"])

    def set(self, rid: str, guess: str, quality: str, comment: str) -> None:
        with self.lock:
            self.rows[rid] = {"guess": guess, "quality": quality, "comment": comment}
            atomic_write_text(self.path, csv_text(FIELDS, ({"id": i, **self.rows[i]} for i in self.ids)))


def parse_answer(body: bytes, ids: set[str]) -> tuple[str, str, str, str]:
    try:
        d = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    rid, guess = str(d.get("id", "")), str(d.get("guess", "")).lower()
    quality, comment = str(d.get("quality", "") or ""), str(d.get("comment", "") or "")
    if rid not in ids:
        raise ValueError("unknown id")
    if guess not in GUESSES + ("",):
        raise ValueError("guess must be real or synthetic")
    if quality not in ("", "1", "2", "3", "4", "5"):
        raise ValueError("quality must be 1 to 5")
    comment = " ".join(comment.split())[:500]
    return rid, guess, quality, comment


def make_server(cfg: ReviewConfig) -> ThreadingHTTPServer:
    """A server ready to `serve_forever()`; `server.server_address` is where it listens."""
    cfg.validate()
    ids = review_ids(cfg.audit)
    order = reader_order(ids, cfg.reader)
    answers = Answers(Path(cfg.audit) / "review" / f"{cfg.reader}.csv", ids)
    images = Path(cfg.audit) / "review" / "images"
    page = PAGE.read_bytes()
    known = set(ids)

    class Handler(BaseHTTPRequestHandler):
        server_version = "xraygan-review"
        sys_version = ""

        def log_message(self, *args) -> None:  # no request log on the reader's terminal
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: dict, status: int = 200) -> None:
            self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            elif path == "/api/state":
                with answers.lock:
                    rows = {i: dict(answers.rows[i]) for i in order}
                first = next((k for k, i in enumerate(order) if not rows[i]["guess"]), len(order))
                self._json({"reader": cfg.reader, "order": order, "answers": rows, "position": first})
            elif path.startswith("/img/") and path.endswith(".png") and path[5:-4] in known:
                self._send(200, (images / f"{path[5:-4]}.png").read_bytes(), "image/png")
            else:
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/api/answer":
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
                return
            n = int(self.headers.get("Content-Length") or 0)
            if not 0 < n <= 10_000:
                self._json({"error": "bad length"}, HTTPStatus.BAD_REQUEST)
                return
            try:
                rid, guess, quality, comment = parse_answer(self.rfile.read(n), known)
            except ValueError as e:
                self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
                return
            answers.set(rid, guess, quality, comment)
            self._json({"ok": True, "answered": answers.answered(), "total": len(order)})

    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:
        raise InputError(f"{cfg.host}:{cfg.port}: cannot listen there ({(e.strerror or str(e)).lower()}); "
                         "choose another --port") from None
    server.daemon_threads = True
    server.review = {"answers": answers, "total": len(order)}  # type: ignore[attr-defined]
    return server


def serve(cfg: ReviewConfig, ready=None) -> dict:
    """Serve until Ctrl-C; `ready(url, answered, total)` is called once it listens."""
    server = make_server(cfg)
    host, port = server.server_address[:2]
    url = f"http://{'[' + host + ']' if ':' in str(host) else host}:{port}/"
    answers = server.review["answers"]  # type: ignore[attr-defined]
    if ready:
        ready(url, answers.answered(), server.review["total"])  # type: ignore[attr-defined]
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return {"answers": str(answers.path), "answered": answers.answered(), "total": server.review["total"]}  # type: ignore[attr-defined]
