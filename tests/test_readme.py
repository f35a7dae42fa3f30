"""The README's tour runs as written, in the order shown, on the shipped sample."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xraygan.cli import app

pytestmark = pytest.mark.slow  # whole pipelines: `pytest -m "not slow"` leaves them out

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- tour:start -->\s*```bash\n(.*?)```\s*<!-- tour:end -->", text, re.S).group(1)
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("xraygan ")]


def test_readme_tour_runs_as_written(tmp_path, monkeypatch):
    cmds = tour_commands()
    assert len(cmds) >= 10
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for argv in cmds:
        r = runner.invoke(app, argv)
        assert r.exit_code == 0, (argv, r.stderr[-2000:])
    assert (tmp_path / "runs/clf-dcgan/report/report.md").is_file()  # the bare --report
    table = (tmp_path / "results" / "table.md").read_text()
    assert "| clf-dcgan |" in table and "| clf-baseline |" in table
