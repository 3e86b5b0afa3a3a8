"""The documentation is true to the code: its Python runs, its commands parse, and MkDocs builds it strictly.

Every ```python block of a page runs, in page order, in one namespace per page. Pages run in the order of the
navigation, then the README (the quickstart's model stands in for the one ``make demo`` writes), in one
working folder that starts with ``tire/`` (an MVTec-layout slice of real tire images), so later pages use what
the quickstart trains (``runs/tire``), as a reader would. A block preceded by ``<!-- no-run: reason -->`` is
skipped. A page that starts with ``<!-- needs: INVERT_AD_PEERS -->`` runs only when the peer checkpoint folders
(``$INVERT_AD_PEERS``, else ``../shared/peers``) exist, with that variable set to them. Every ``invert-ad ...``
line of a ```bash block must parse with the real argument parser.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from invert_ad.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README = ROOT / "README.md"
NAV = re.findall(r"^  - [^:\n]+: (\w+\.md)$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.MULTILINE)
PEERS = Path(os.environ.get("INVERT_AD_PEERS", ROOT.parent / "shared" / "peers")).resolve()
NEEDS_PEERS = "<!-- needs: INVERT_AD_PEERS -->"
FENCE = re.compile(r"(?P<marker><!-- no-run: [^>]+ -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)\n```", re.DOTALL)


def blocks(page: Path, lang: str) -> list[tuple[str, bool]]:
    """``(code, runs)`` for every fenced block of ``lang`` in ``page``, in order."""
    return [
        (m["code"], m["marker"] is None) for m in FENCE.finditer(page.read_text(encoding="utf-8")) if m["lang"] == lang
    ]


def cli_lines(code: str) -> list[list[str]]:
    """Arguments of every ``invert-ad ...`` (or ``... -m invert_ad.cli ...``) command in a shell block."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for start in ("invert-ad", "invert_ad.cli"):
            if start in words:
                commands.append(words[words.index(start) + 1 :])
    return commands


@pytest.fixture(scope="module")
def workdir(tire_dir, tmp_path_factory):
    """A folder with ``tire/`` (12 normal training images, 2 good and 2 cut test images with masks)."""
    root = tmp_path_factory.mktemp("docs")
    picks = {
        "train/good": sorted((tire_dir / "train/good").iterdir())[:12],
        "test/good": sorted((tire_dir / "test/good").iterdir())[:2],
        "test/cut": sorted((tire_dir / "test/cut").iterdir())[:2],
    }
    for folder, files in picks.items():
        (root / "tire" / folder).mkdir(parents=True)
        for f in files:
            os.symlink(f, root / "tire" / folder / f.name)
    (root / "tire/ground_truth/cut").mkdir(parents=True)
    for f in picks["test/cut"]:
        mask = f"{f.stem}_mask.png"
        os.symlink(tire_dir / "ground_truth/cut" / mask, root / "tire/ground_truth/cut" / mask)
    return root


def run_page(page: Path) -> None:
    """Execute the runnable Python blocks of ``page`` in order, in one namespace."""
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for index, (code, runs) in enumerate(blocks(page, "python")):
        if runs:
            exec(compile(code, f"{page.name}[python block {index}]", "exec"), namespace)


@pytest.fixture(scope="module")
def page_errors(workdir) -> dict[str, BaseException]:
    """Run every page in navigation order in ``workdir``; the exception each failing page raised, by name."""
    errors = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("INVERT_AD_CACHE", str(workdir / "cache"))
        patch.setenv("INVERT_AD_PEERS", str(PEERS))
        for name in NAV:
            if _needs_missing_peers(name):
                continue
            try:
                run_page(DOCS / name)
            except Exception as err:
                errors[name] = err
        if not (workdir / "runs/demo/model").exists() and (workdir / "runs/tire").exists():
            shutil.copytree(workdir / "runs/tire", workdir / "runs/demo/model")  # what `make demo` leaves
        try:
            run_page(README)
        except Exception as err:
            errors[README.name] = err
    return errors


def _needs_missing_peers(name: str) -> bool:
    page = README if name == README.name else DOCS / name
    return page.read_text(encoding="utf-8").startswith(NEEDS_PEERS) and not PEERS.is_dir()


def test_every_page_is_in_the_navigation():
    assert sorted(NAV) == sorted(p.name for p in PAGES)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*(n for n in NAV if blocks(DOCS / n, "python")), "README.md"])
def test_python_blocks_run(name, page_errors):
    if _needs_missing_peers(name):
        pytest.skip(f"{name} runs against the peer checkpoints; none under {PEERS} (set INVERT_AD_PEERS)")
    if name in page_errors:
        raise page_errors[name]


@pytest.mark.parametrize("page", [p for p in [*PAGES, README] if blocks(p, "bash")], ids=lambda p: p.name)
def test_cli_commands_parse(page):
    parser = build_parser()
    for code, _ in blocks(page, "bash"):
        for args in cli_lines(code):
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"{page.name}: `invert-ad {shlex.join(args)}` does not parse")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (docs extra)")
def test_mkdocs_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "api/scoring/index.html").is_file()
