"""The README and the docs say what runs: the quickstart runs as written, every `streammem ...`
command they name exists, every relative link and benchmark script they cite is in the
repository, and the README stays a short front page that starts with `make run` / `make test`."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the pages that carry commands and links: the README, docs/ and the model cards
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "streammem" / "checkpoints").glob("*/README.md"))]
WORLD_CLASSES = {"person", "cat", "cup", "rocket", "shuttle", "motorcycle", "horse", "circle", "square", "triangle",
                 "star"}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def section(text: str, title: str) -> str:
    """The README text under the ``## title`` heading, up to the next ``## `` heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_readme_is_a_short_front_page_that_starts_with_make_run_and_make_test():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines; keep it <= 200 (details go to docs/)"
    lang, body = code_blocks(text)[0]
    commands = [line.split("#")[0].strip() for line in body.splitlines() if line.split("#")[0].strip()]
    assert commands[:2] == ["make run", "make test"], f"the README's first commands must be make run, make test: {commands}"


def test_quickstart_runs_as_written():
    """The README's quickstart, run from the repository root in a fresh interpreter: it detects
    objects that are in view, and answers from memory with evidence from the stream it saw."""
    blocks = [body for lang, body in code_blocks(section(README.read_text(), "Quickstart")) if lang == "python"]
    assert len(blocks) == 1, "the Quickstart section should hold one python block"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", blocks[0]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the quickstart failed:\n{proc.stderr[-3000:]}"
    out = dict(line.split(":", 1) for line in proc.stdout.splitlines() if line.startswith(("detected:", "in view:")))
    detected, in_view = ast.literal_eval(out["detected"].strip()), ast.literal_eval(out["in view"].strip())
    assert detected and set(detected) <= WORLD_CLASSES, detected
    assert set(detected) & set(in_view), f"nothing detected is in view: {detected} vs {in_view}"
    answer = [line for line in proc.stdout.splitlines() if line.startswith(("yes ", "no "))]
    assert len(answer) == 1, proc.stdout
    text, confidence, *_ = answer[0].split()
    times = [float(t) for t in re.findall(r"[\d.]+", answer[0].split("evidence at", 1)[1])]
    assert 0.5 <= float(confidence) <= 1.0  # the chosen one of two candidates
    assert times and all(0.0 <= t <= 8.0 for t in times), f"evidence outside the 8 s stream: {times}"


def named_commands() -> dict[tuple[str, ...], set[str]]:
    """Every ``streammem CMD [SUB|SUB...] [--option ...]`` the pages name, in shell code blocks
    or inline code, with a sub-command only where CMD is a command group -> the options given."""
    groups = typer.main.get_command(_app()).commands
    found: dict[tuple[str, ...], set[str]] = {}
    for page in PAGES:
        text = page.read_text()
        lines = [line.strip().removeprefix("$ ") for lang, body in code_blocks(text) if lang != "python"
                 for line in body.splitlines()]
        lines += re.findall(r"`(streammem [^`]+)`", text)
        for line in lines:
            m = re.match(r"streammem ([a-z][a-z-]*)(?: ([a-z][a-z|-]*)\b)?", line)
            if not m:
                continue
            cmd, sub = m.group(1), m.group(2)
            options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line.split("#")[0]))
            if sub and hasattr(groups.get(cmd), "commands"):  # a command group
                for s in sub.split("|"):
                    found.setdefault((cmd, s), set()).update(options)
            else:
                found.setdefault((cmd,), set()).update(options)
    return found


def _app():
    from streammem.cli import app

    return app


def test_pages_name_commands():
    """The parser below finds what the README's CLI section lists (a guard against a parser
    that finds nothing and so checks nothing)."""
    names = named_commands()
    for cmd in ("info", "run", "detect", "ask"):
        assert (cmd,) in names
    for group, sub in (("world", "gallery"), ("train", "answerer"), ("eval", "qa"), ("eval", "routing")):
        assert (group, sub) in names


@pytest.mark.parametrize("command", sorted(named_commands()), ids=" ".join)
def test_every_named_command_and_option_exists(command):
    result = CliRunner().invoke(_app(), [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"`streammem {' '.join(command)} --help` failed: {result.output[-1000:]}"
    unknown = sorted(o for o in named_commands()[command] if o not in re.findall(r"--[a-z][a-z-]*", result.output))
    assert not unknown, f"`streammem {' '.join(command)}` has no option(s) {unknown}"


def test_relative_links_and_cited_scripts_exist():
    """Relative links resolve; each `benchmarks/*.py` cited exists and defines the options given."""
    missing = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
        for script, args in re.findall(r"(benchmarks/\w+\.py)([^`\n]*)", text):
            if not (ROOT / script).is_file():
                missing.append(f"{page.relative_to(ROOT)} -> {script}")
                continue
            source = (ROOT / script).read_text()
            for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", args.split("#")[0]):
                if f'"{option}"' not in source:
                    missing.append(f"{page.relative_to(ROOT)} -> {script} {option}")
    assert not missing, "missing link targets: " + "; ".join(missing)
