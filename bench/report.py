"""BENCHMARKS.md: the results of the last full and quick runs, between markers.

Results are kept in ``bench/results.json`` (per mode, per case and variant), so a
run with ``--only`` replaces just its own rows. Text outside the markers is hand-written
and left alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

CASE_ORDER = ("transfer", "swarm", "small", "tracker", "verify", "memory", "faults", "wan")
RESULTS = Path(__file__).resolve().parent / "results.json"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return " / ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render(mode: str, state: dict[str, Any]) -> str:
    lines = [f"### Last {mode} run", ""]
    lines += [
        f"- {r['date']}: `{r['command']}` ({r['seconds']:.0f} s; 1-min load average at start: {r['load']})"
        for r in state.get("runs", [])
    ]
    lines += ["- machine: " + ", ".join(f"{k} {v}" for k, v in state["machine"].items()), ""]
    rows: list[dict[str, Any]] = list(state["rows"].values())
    targets = [(r["variant"], t) for r in rows for t in r.get("targets", [])]
    if targets:
        lines += ["| target | result | measured |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {'PASS' if t['pass'] else 'MISS'} | {t['detail']} |" for _, t in targets]
        lines.append("")
    for case in CASE_ORDER:
        case_rows = [r for r in rows if r["case"] == case]
        if not case_rows:
            continue
        skip = {"case", "variant", "targets", "note"}
        cols: list[str] = []
        for r in case_rows:
            cols += [k for k in r if k not in skip and k not in cols]
        lines += [f"#### {case}", "", "| variant | " + " | ".join(cols) + " | note |", "| --- " * (len(cols) + 2) + "|"]
        for r in case_rows:
            lines.append(
                f"| {r['variant']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + f" | {r.get('note', '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def update(
    md: Path,
    mode: str,
    rows: list[dict[str, Any]],
    machine: dict[str, str],
    command: str,
    seconds: float,
    load: float,
    complete: bool,
) -> None:
    """Merge ``rows`` into the stored results of ``mode`` and rewrite that block of ``md``."""
    try:
        stored: dict[str, Any] = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        stored = {}
    state = {"rows": {}, "runs": []} if complete else stored.get(mode, {"rows": {}, "runs": []})
    for r in rows:
        state["rows"][f"{r['case']}: {r['variant']}"] = r
    state.setdefault("runs", []).append(
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command,
            "seconds": seconds,
            "load": load,
        }
    )
    state["runs"] = state["runs"][-6:]
    state["machine"] = machine
    stored[mode] = state
    RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
    write_block(md, mode, state)


def write_block(md: Path, mode: str, state: dict[str, Any]) -> None:
    """Replace the block of ``mode`` in ``md`` (or append it)."""
    begin, end = f"<!-- bench:{mode} -->", f"<!-- /bench:{mode} -->"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    block = f"{begin}\n{render(mode, state)}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.write_text(text)


if __name__ == "__main__":  # re-render BENCHMARKS.md from bench/results.json
    _stored = json.loads(RESULTS.read_text())
    for _mode, _state in _stored.items():
        write_block(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", _mode, _state)
