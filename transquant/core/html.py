"""Self-contained HTML pages (report and statistics pages): tables, inline PNG figures, no
external files, so a page opens the same from disk, from MLflow's artifact viewer and on paper."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .note { color: #555; font-size: .9em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
.scroll { overflow-x: auto; }
@media print { body { max-width: none; } .scroll { overflow: visible; } h2 { page-break-after: avoid; }
               table, figure { page-break-inside: avoid; } }
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def table(df: pd.DataFrame, table_id: str | None = None, caption: str | None = None,
          text_cols: set[str] | None = None) -> str:
    """``df`` as an HTML table; numbers right-aligned, text left-aligned, NaN empty. ``text_cols``
    names the text columns of a table of preformatted cells (strings that carry numbers)."""
    if text_cols is None:
        text_cols = {c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])}
    head = "".join(f'<th class="{"text" if c in text_cols else "num"}">{esc(c)}</th>' for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = "".join(f'<td class="{"text" if c in text_cols else "num"}">{esc(_cell(v))}</td>'
                        for c, v in zip(df.columns, rec))
        rows.append(f"<tr>{cells}</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table{ident}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def facts(rows: dict[str, str]) -> str:
    """Label / value pairs (who, what, how a page was made) as a two-column table."""
    body = "".join(f'<tr><th class="text">{esc(k)}</th><td class="text">{esc(v)}</td></tr>' for k, v in rows.items())
    return f'<div class="scroll"><table class="facts"><tbody>{body}</tbody></table></div>'


def figure(png: str | Path, caption: str = "") -> str:
    """A PNG file inlined as a data URI, with its caption."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(caption or Path(png).stem)}" src="data:image/png;base64,{data}">{cap}</figure>'


def page(title: str, body: str) -> str:
    """A complete HTML5 document around ``body`` (already HTML)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n")


def write_page(path: str | Path, title: str, body: str) -> Path:
    """Write atomically: a reader (or MLflow's artifact logging) never sees half a page."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page(title, body), encoding="utf-8")
    tmp.replace(path)
    return path
