"""The dashboard in a real browser: headless Chromium draws the ingest chart served by real gunicorn."""

from __future__ import annotations

import struct
import subprocess
import zlib
from datetime import datetime, timedelta, timezone

import falcon.testing
import pytest

from records_service.app import create_app
from records_service.config import Settings
from tests.conftest import Clock
from tests.live import debian_command
from tests.test_api import post
from tests.test_operations import bars

BAR_RGB = (0x2B, 0x6C, 0xB0)  # .chart .bar in records_service/dashboard.py
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,1000"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing."""
    return debian_command("chromium", "chromium")


def run_chromium(chromium: str, profile, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, timeout=120)


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, bytes per pixel, rows of pixel bytes) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    pixel = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * pixel
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - pixel] if i >= pixel else 0
            up, up_left = previous[i], previous[i - pixel] if i >= pixel else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, pixel, rows


def test_chromium_draws_the_ingest_chart(chromium, start_server, tmp_path, record):
    # A week of ingest with a daily rhythm, written through the API at past instants, then served live.
    db_path = tmp_path / "records.db"
    now = datetime.now(timezone.utc)
    clock = Clock(now)
    client = falcon.testing.TestClient(create_app(Settings(db_path=str(db_path), auth="disabled"), clock=clock))
    expected_hours = set()
    for hours_ago in range(2, 160):
        moment = now - timedelta(hours=hours_ago)
        count = 1 + 4 * (8 <= moment.hour < 18)
        for n in range(count):
            clock.now = moment
            assert post(client, {**record, "test_id": f"h{hours_ago}-{n}"}).status_code == 201
        expected_hours.add(moment.strftime("%Y-%m-%dT%H"))
    server = start_server(workers=1, db_path=db_path)
    url = f"http://127.0.0.1:{server.port}/"

    dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    drawn = bars(dom.stdout.decode())
    assert set(drawn) == expected_hours
    assert {count for count in drawn.values()} == {1, 5}

    shot = tmp_path / "dashboard.png"
    out = run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert out.returncode == 0 and shot.exists(), out.stderr.decode(errors="replace")[-2000:]
    width, pixel, rows = read_png(shot.read_bytes())
    columns = set()
    for row in rows:
        for x in range(width):
            r, g, b = row[x * pixel:x * pixel + 3]
            if abs(r - BAR_RGB[0]) + abs(g - BAR_RGB[1]) + abs(b - BAR_RGB[2]) <= 12:
                columns.add(x)
    # Bars painted in the bar colour, spread over most of the chart's width (158 hours of 168).
    assert len(columns) > 300, f"only {len(columns)} pixel columns in the bar colour: see {shot}"
    assert max(columns) - min(columns) > 0.6 * width, f"bars do not span the chart: see {shot}"
    print(f"screenshot: {shot}")
