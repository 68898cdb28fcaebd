"""The documentation site builds without a warning, its Python blocks run as written, and the README stays short."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: subprocesses, builds, whole runs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def python_blocks() -> list[tuple[str, str]]:
    """(page name, code) of every ```python block of every docs/*.md page."""
    return [
        (page.name, code)
        for page in sorted(DOCS.glob("*.md"))
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    ]


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        str(DOCS),
        str(tmp_path / "html"),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    spec_page = (tmp_path / "html" / "spec.html").read_text()
    assert "model.prior.components" in spec_page and "inference.ciwae_beta" in spec_page


@pytest.mark.parametrize(
    "page, code", python_blocks(), ids=[f"{page}-{i}" for i, (page, _) in enumerate(python_blocks())]
)
def test_every_python_block_runs_in_a_fresh_interpreter(page, code, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{page}: {result.stderr[-2000:]}"


def test_a_note_on_a_key_the_spec_does_not_have_fails_the_build():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import spec_reference
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    from sphinx.errors import ExtensionError

    spec_reference.check_notes(spec_reference.NOTES)
    with pytest.raises(ExtensionError, match="model.prior.dof"):
        spec_reference.check_notes({"model.prior.dof": "a misspelt key"})
    assert "model.prior.components" in spec_reference.every_key()


def test_the_readme_is_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
