"""Write each command page's option table from the command-line help itself, so a page can
never disagree with `xraygan COMMAND --help`: `python docs/make_options.py` rewrites the tables
between the `<!-- options:start -->` and `<!-- options:end -->` markers of docs/commands/*.md
(tests/test_docs.py fails when one is out of date)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from xraygan import contract

PAGES = Path(__file__).resolve().parent / "commands"
MARKERS = re.compile(r"<!-- options:start -->\n.*?<!-- options:end -->", re.S)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_table(cmd) -> str:
    rows = ["| argument or option | default | what it is |", "|---|---|---|"]
    for p in cmd.params:
        if p.name == "help":
            continue
        argument = p.param_type_name == "argument"  # typer may carry its own copy of click
        if argument:
            name = f"`{p.name.upper()}`" + (" …" if p.nargs == -1 else "")
        else:
            name = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        default = "required" if p.required else ("" if p.default in (None, (), []) else p.default)
        if isinstance(default, bool) and not argument and p.secondary_opts:
            default = p.opts[0] if default else p.secondary_opts[0]
        elif isinstance(default, bool):
            default = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        rows.append(f"| {name} | {_cell(f'`{default}`' if default not in ('', 'required') else default)} | "
                    f"{_cell(getattr(p, 'help', None) or '')} |")
    return "\n".join(rows) + "\n"


def writes_line(name: str) -> str:
    """What the command writes into --out, from the table `--force` itself checks against."""
    from xraygan.fsutil import OUTPUTS

    if name not in OUTPUTS:
        return ""
    record, outputs = OUTPUTS[name]
    named = [f"`{o}`" for o in outputs if o != "*"]
    rest = " and the files it names there" if "*" in outputs and named else ""
    return (f"\n**Writes** into its output folder: its record `{record}`{', ' if named else ' and '}{', '.join(named) or 'the class folders'}"
            f"{rest}. `--force` replaces the folder only when it holds that record and nothing it did not write.\n")


def commands() -> dict:
    return {name: c for name, c in contract.commands().items() if not c.hidden}


def rendered(page: Path, cmd) -> str:
    text = page.read_text()
    block = f"<!-- options:start -->\n{options_table(cmd)}{writes_line(page.stem)}<!-- options:end -->"
    if not MARKERS.search(text):
        raise SystemExit(f"{page}: no <!-- options:start --> / <!-- options:end --> markers")
    return MARKERS.sub(lambda _: block, text)


def main() -> None:
    for name, cmd in commands().items():
        page = PAGES / f"{name}.md"
        if not page.is_file():
            sys.exit(f"{page}: missing (every command has a page)")
        new = rendered(page, cmd)
        if new != page.read_text():
            page.write_text(new)
            print(f"updated {page}")


if __name__ == "__main__":
    main()
