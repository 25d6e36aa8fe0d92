"""One self-contained HTML report: figures embedded as base64 PNGs, tables inline, no external assets."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

import pandas as pd

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1180px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .82em; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.note { color: #555; font-size: .9em; } .meta td { text-align: left; } code { background: #f4f4f4; padding: 0 3px; }
details summary { cursor: pointer; color: #335; }
"""


@dataclass
class Section:
    """A report section: title, explanatory paragraphs (HTML-escaped), figures and tables."""

    title: str
    text: list[str] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    collapsed: list[tuple[str, pd.DataFrame]] = field(default_factory=list)


def _number(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return html.escape(str(value))


def table_html(frame: pd.DataFrame, max_rows: int = 200) -> str:
    """``frame`` as an HTML table (values escaped, floats to 4 significant digits)."""
    shown = frame.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_number(v)}</td>" for v in row) + "</tr>" for row in shown.itertuples(index=False)
    )
    more = (
        f'<p class="note">first {max_rows} of {len(frame)} rows; all of them are in the CSV/Parquet files</p>'
        if len(frame) > max_rows
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def image_html(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"><figcaption class="note">{html.escape(caption)}</figcaption></figure>'


def render(title: str, meta: dict[str, str], sections: list[Section]) -> str:
    """The whole report as one HTML document."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
    ]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(
        "<table class='meta'>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in meta.items())
        + "</table>"
    )
    parts.append(
        "<ul>"
        + "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections))
        + "</ul>"
    )
    for index, section in enumerate(sections):
        parts.append(f"<h2 id='s{index}'>{html.escape(section.title)}</h2>")
        parts.extend(f"<p>{html.escape(text)}</p>" for text in section.text)
        parts.extend(image_html(caption, png) for caption, png in section.figures)
        for caption, frame in section.tables:
            parts.append(f"<p class='note'>{html.escape(caption)}</p>{table_html(frame)}")
        for caption, frame in section.collapsed:
            parts.append(f"<details><summary>{html.escape(caption)}</summary>{table_html(frame)}</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
