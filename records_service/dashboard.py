"""The dashboard page: pure functions from already-gathered figures to one HTML document.

Plain HTML, inline CSS and inline SVG: no script, no font, no image, nothing fetched from
anywhere (the resource also sends a Content-Security-Policy that forbids it). Every value
that came from outside (clinic ids, request paths) is escaped here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from . import __version__
from .validate import utc_millis

CHART_HOURS = 7 * 24
TOP_CLINICS = 100

# Chart geometry in SVG user units; the viewBox scales it to the page width.
_BAR_STEP, _BAR_WIDTH = 6, 5
_LEFT, _TOP, _PLOT_HEIGHT, _BOTTOM = 56, 12, 180, 40
_PLOT_WIDTH = CHART_HOURS * _BAR_STEP


@dataclass(frozen=True)
class DashboardView:
    generated_at: datetime          # UTC; the chart's last hour is the one containing it
    started_at: datetime            # UTC; when the service (the gunicorn master) started
    uptime_s: float
    pid: int
    db: dict | None                 # Store.dashboard_counts(), or None when it could not be read
    db_problem: str | None          # why db is None, in words fit for an operator
    failures_total: int
    failures: list[dict]            # newest first, as runtime.FailureLog.recent() gives them
    imports: tuple = ()             # Store.import_runs(): each source's last (or current) run


def hour_key(moment: datetime) -> str:
    """The counter key of the UTC hour holding `moment`: created_at's first 13 characters."""
    return moment.strftime("%Y-%m-%dT%H")


def chart_hours(now: datetime) -> list[datetime]:
    """The starts of the last CHART_HOURS UTC hours, oldest first, the current one last."""
    current = now.replace(minute=0, second=0, microsecond=0)
    return [current - timedelta(hours=n) for n in range(CHART_HOURS - 1, -1, -1)]


def render(view: DashboardView) -> str:
    db = view.db
    sections = [_overview(view)]
    if db is None:
        sections.append(f'<section><h2>Database</h2><p class="bad">{escape(view.db_problem or "unavailable")}</p>'
                        "</section>")
    else:
        hours = chart_hours(view.generated_at)
        series = [(start, db["hours"].get(hour_key(start), 0)) for start in hours]
        week_total = sum(count for _, count in series)
        sections.append(f"<section><h2>Records ingested per hour, last 7 days (UTC)</h2>"
                        f"<p>{week_total:,} records in the last 7 days.</p>{ingest_chart(series)}</section>")
        sections.append(_clinics(db))
        sections.append(_imports(view.imports))
    sections.append(_failures(view))
    return _PAGE.format(generated=escape(_iso(view.generated_at)), version=escape(__version__), pid=view.pid,
                        body="\n".join(sections))


def ingest_chart(series: list[tuple[datetime, int]]) -> str:
    """An SVG bar chart of (hour start, count): one bar per hour with records, a label per day."""
    step = _nice_step(max((count for _, count in series), default=0) / 4)
    top = step * max(1, -(-max((count for _, count in series), default=0) // step))
    parts = []
    for tick in range(0, top + 1, step):
        y = _TOP + _PLOT_HEIGHT * (1 - tick / top)
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + _PLOT_WIDTH}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{_short_number(tick)}</text>")
    for n, (start, count) in enumerate(series):
        x = _LEFT + n * _BAR_STEP
        # A label per midnight, and one for the first day when enough of it is shown to fit it.
        if start.hour == 0 or (n == 0 and start.hour <= 12):
            parts.append(f'<line class="day" x1="{x}" x2="{x}" y1="{_TOP}" y2="{_TOP + _PLOT_HEIGHT + 6}"/>'
                         f'<text class="axis" x="{x + 2}" y="{_TOP + _PLOT_HEIGHT + 20}">'
                         f'{start.strftime("%a %d %b")}</text>')
        if count:
            height = max(1.0, _PLOT_HEIGHT * count / top)
            parts.append(f'<rect class="bar" x="{x}" y="{_TOP + _PLOT_HEIGHT - height:.1f}" width="{_BAR_WIDTH}" '
                         f'height="{height:.1f}" data-hour="{hour_key(start)}" data-count="{count}">'
                         f'<title>{start.strftime("%a %d %b %H:00")} UTC: {count:,} records</title></rect>')
    width, height = _LEFT + _PLOT_WIDTH + 8, _TOP + _PLOT_HEIGHT + _BOTTOM
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="Records ingested per hour over the last 7 days">{"".join(parts)}</svg>')


def _overview(view: DashboardView) -> str:
    db = view.db or {}
    tiles = [
        ("records", "Records", f"{db['records']:,}" if db else "?"),
        ("clinics", "Clinics", f"{db['clinic_count']:,}" if db else "?"),
        ("database-size", "Database size", _bytes(db["database_bytes"]) if db else "?"),
        ("wal-size", "WAL size", _bytes(db["wal_bytes"]) if db else "?"),
        ("schema-version", "Schema version", str(db["schema_version"]) if db else "?"),
        ("journal-mode", "Journal mode", db["journal_mode"] if db else "?"),
        ("uptime", "Uptime", _duration(view.uptime_s)),
        ("failures", "Failures since start", f"{view.failures_total:,}"),
    ]
    cells = "".join(f'<div class="tile" id="{name}"><div class="label">{escape(label)}</div>'
                    f'<div class="value">{escape(value)}</div></div>' for name, label, value in tiles)
    since = utc_millis(view.started_at)
    return (f'<section class="tiles">{cells}</section>'
            f'<p class="sub">Serving since <time id="started-at" datetime="{since}">{_iso(view.started_at)}</time>.</p>')


def _clinics(db: dict) -> str:
    rows = db["clinics"]
    if not rows:
        return "<section><h2>Records per clinic</h2><p>No records yet.</p></section>"
    largest = rows[0][1]
    body = "".join(
        f'<tr data-clinic="{escape(clinic)}" data-total="{total}"><td>{escape(clinic)}</td><td class="num">{total:,}</td>'
        f'<td class="meter"><span style="width:{100 * total / largest:.1f}%"></span></td></tr>'
        for clinic, total in rows)
    count = db["clinic_count"]
    shown = (f"The {len(rows)} largest of {count:,} clinics." if count > len(rows)
             else "One clinic." if count == 1 else f"All {count:,} clinics, largest first.")
    return (f"<section><h2>Records per clinic</h2><p>{shown}</p>"
            f'<table class="clinics"><thead><tr><th>Clinic</th><th class="num">Records</th><th></th></tr></thead>'
            f"<tbody>{body}</tbody></table></section>")


def _imports(runs) -> str:
    heading = "<h2>Imports from upstream APIs</h2>"
    if not runs:
        return (f"<section>{heading}<p>No import has run yet "
                f"(<code>python -m records_service import SOURCE_FILE</code>).</p></section>")
    counts = ("pages", "fetched", "created", "updated", "unchanged", "failed")
    body = "".join(
        f'<tr data-source="{escape(run["source"])}" data-complete="{str(run["complete"]).lower()}">'
        f'<td>{escape(run["source"])}</td><td>{escape(run["updated_at"])}</td>'
        f'<td class="{"" if run["complete"] else "bad"}">'
        f'{"completed" if run["complete"] else "not completed: resumes at page " + str(run["pages"] + 1)}</td>'
        + "".join(f'<td class="num{" bad" if name == "failed" and run[name] else ""}">{run[name]:,}</td>'
                  for name in counts)
        + f'<td><code>{escape(run["request_id"])}</code></td></tr>'
        for run in runs)
    head = "".join(f'<th class="num">{name.capitalize()}</th>' for name in counts)
    return (f"<section>{heading}<p>Each source's last run (a run not completed is resumed by the next one). "
            f"Its request ID finds what it wrote in <code>/audit</code>, the logs and <code>trace</code>.</p>"
            f'<table class="imports"><thead><tr><th>Source</th><th>Last page at (UTC)</th><th>Run</th>{head}'
            f"<th>Request ID</th></tr></thead><tbody>{body}</tbody></table></section>")


def _failures(view: DashboardView) -> str:
    heading = "<h2>What failed recently</h2>"
    if not view.failures:
        return (f"<section>{heading}<p>Nothing since the service started: responses with status 500 or more "
                f"(including 503 busy or not ready) would be listed here.</p></section>")
    body = "".join(
        f'<tr><td>{escape(str(f.get("at", "")))}</td><td class="num bad">{escape(str(f.get("status", "")))}</td>'
        f'<td>{escape(str(f.get("type", "")))}</td><td>{escape(str(f.get("method", "")))} '
        f'{escape(str(f.get("path", "")))}</td><td><code>{escape(str(f.get("request_id", "")))}</code></td>'
        f'<td class="num">{escape(str(f.get("pid", "")))}</td><td class="num">{f.get("repeats", 1):,}</td></tr>'
        for f in view.failures)
    return (f"<section>{heading}<p>{view.failures_total:,} responses with status 500 or more since the service "
            f"started; the last {len(view.failures)} distinct ones, newest first (a failure repeated back to back "
            f"is one row, with its latest time and request ID). Grep the logs for the request ID.</p>"
            f'<table class="failures"><thead><tr><th>At (UTC)</th><th class="num">Status</th><th>Problem</th>'
            f'<th>Request</th><th>Request ID</th><th class="num">Worker</th><th class="num">Times</th></tr></thead>'
            f"<tbody>{body}</tbody></table></section>")


def _nice_step(value: float) -> int:
    """The smallest of 1, 2, 5 × 10^k at least `value`: gridlines at whole, round counts."""
    scale = 1
    while True:
        for multiple in (1, 2, 5):
            if scale * multiple >= value:
                return scale * multiple
        scale *= 10


def _short_number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1_000:
        return f"{value / 1_000:g}k"
    return f"{value:g}"


def _bytes(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h {minutes} min"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="60">
<title>records_service dashboard</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1120px; padding: 16px; color: #1a202c; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
h2 {{ font-size: 16px; margin: 24px 0 8px; }}
.sub {{ color: #4a5568; margin: 0 0 16px; }}
.tiles {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 8px; }}
.tile {{ border: 1px solid #e2e8f0; border-radius: 6px; padding: 8px 12px; }}
.label {{ color: #4a5568; font-size: 12px; }}
.value {{ font-size: 20px; font-weight: 600; }}
.chart {{ width: 100%; height: auto; }}
.chart .bar {{ fill: #2b6cb0; }}
.chart .grid {{ stroke: #e2e8f0; }}
.chart .day {{ stroke: #a0aec0; }}
.chart .axis {{ fill: #4a5568; font-size: 11px; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: 3px 8px; border-bottom: 1px solid #edf2f7; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.meter {{ width: 50%; }}
.meter span {{ display: block; height: 10px; background: #90cdf4; }}
.bad {{ color: #c53030; }}
code {{ font-size: 12px; }}
</style>
</head>
<body>
<h1>records_service</h1>
<p class="sub">Generated {generated} by version {version} (worker {pid}); refreshes every minute.</p>
{body}
</body>
</html>
"""
