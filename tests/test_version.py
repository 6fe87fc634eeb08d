"""One version, everywhere an operator or a client looks: the package, --version, /ready, the
OpenAPI document and the CHANGELOG."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from records_service import __version__
from tests.live import REPO


def test_the_version_is_semantic():
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_the_command_line_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "records_service", "--version"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"records_service {__version__}\n"


def test_ready_says_which_version_is_deployed(start_server):
    resp = start_server(workers=1).request("GET", "/ready")
    assert resp.status == 200
    assert resp.json()["version"] == __version__


def test_the_openapi_document_carries_the_same_version():
    document = json.loads((REPO / "records_service" / "openapi.json").read_text())
    assert document["info"]["version"] == __version__
    assert "version" in document["components"]["schemas"]["Ready"]["required"]


def test_the_changelog_has_a_section_for_the_version():
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(__version__)}\]", changelog, re.MULTILINE), \
        f"CHANGELOG.md has no '## [{__version__}]' section"
