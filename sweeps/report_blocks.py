"""The report as a list of blocks (heading, paragraph, table, image, list) and its two formats: report.md and a
self-contained report.html (images embedded as base64). What the blocks say is in report_render.py.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ====================================================================================== blocks


@dataclass
class TableCell:
    text: str
    cls: str = ""  # html class: pos / neg (significant), up / down (not significant), base, muted


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Paragraph:
    text: str
    cls: str = ""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""
    align_left: int = 1  # leading columns aligned left


@dataclass
class Image:
    path: Path
    alt: str
    caption: str = ""


@dataclass
class BulletList:
    items: list[str] = field(default_factory=list)


Block = Heading | Paragraph | Table | Image | BulletList


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def num(x: float | None, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def pval(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def delta_cell(v: float | None, r) -> TableCell:
    """A difference to the baseline, '*' and coloured where significant after correction."""
    if v is None or not math.isfinite(v):
        return TableCell("-", "muted")
    sig = r is not None and r.significant
    text = f"{v:+.4f}" + ("*" if sig else "")
    if r is not None and not r.tested:
        text += "°"
    cls = ("pos" if v > 0 else "neg") if sig else ("up" if v > 0 else "down" if v < 0 else "")
    return TableCell(text, cls)


# ====================================================================================== markdown / html
def _md_cell(x: Any) -> str:
    t = x.text if isinstance(x, TableCell) else str(x)
    return t.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            if b.anchor:
                out.append(f'<a id="{b.anchor}"></a>\n')
            out.append("#" * b.level + " " + b.text + "\n")
        elif isinstance(b, Paragraph):
            out.append(b.text + "\n")
        elif isinstance(b, BulletList):
            out.append("\n".join(f"- {i}" for i in b.items) + "\n")
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path.relative_to(out_dir).as_posix()})\n" + (f"\n*{b.caption}*\n" if b.caption else ""))
        elif isinstance(b, Table):
            if b.caption:
                out.append(b.caption + "\n")
            if not b.rows:
                out.append("(none)\n")
                continue
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join(":---" if i < b.align_left else "---:" for i in range(len(b.headers))) + "|")
            for r in b.rows:
                out.append("| " + " | ".join(_md_cell(x) for x in r) + " |")
            out.append("")
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1400px;padding:0 16px;color:#1f2328;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:6px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{margin-top:26px}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d0d7de;padding:3px 8px;white-space:nowrap}th{background:#f6f8fa;white-space:normal;max-width:190px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.pos{color:#116329;font-weight:600;background:#dafbe1}td.neg{color:#a40e26;font-weight:600;background:#ffebe9}
td.up{color:#1a7f37}td.down{color:#cf222e}td.base{font-weight:600}td.muted{color:#8c959f}
.caption{font-size:12.5px;color:#57606a;margin:2px 0 10px;max-width:1100px}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;border-radius:6px}
img{max-width:100%;border:1px solid #d0d7de;border-radius:4px;margin-top:6px}
code{background:#f6f8fa;padding:1px 4px;border-radius:4px;font-size:90%}
li{margin:2px 0}
"""


def _html_inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\[([^\]]+)\]\(#([A-Za-z0-9_-]+)\)", r'<a href="#\2">\1</a>', t)
    return t


def _is_num(t: str) -> bool:
    return bool(re.match(r"^[-+]?[\d.]+(e[-+]?\d+)?([*°]|\s|±|\(|\)|/|\d|\.)*$", t.strip())) if t.strip() else False


def to_html(blocks: list[Block], title: str = "Sweep significance report") -> str:
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            aid = f' id="{b.anchor}"' if b.anchor else ""
            out.append(f"<h{b.level}{aid}>{_html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            cls = f' class="{b.cls}"' if b.cls else ""
            out.append(f"<p{cls}>{_html_inline(b.text)}</p>")
        elif isinstance(b, BulletList):
            out.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(b.alt)}' src='data:image/png;base64,{data}'>"
                       + (f"<figcaption class='caption'>{_html_inline(b.caption)}</figcaption>" if b.caption else "")
                       + "</figure>")
        elif isinstance(b, Table):
            if not b.rows:
                out.append(f"<p class='caption'>{_html_inline(b.caption)} (none)</p>")
                continue
            rows = ["<tr>" + "".join(f"<th>{_html_inline(str(h)).replace('+', '+&#8203;')}</th>"
                                     for h in b.headers) + "</tr>"]
            for r in b.rows:
                tds = []
                for i, x in enumerate(r):
                    text = x.text if isinstance(x, TableCell) else str(x)
                    cls = [x.cls] if isinstance(x, TableCell) and x.cls else []
                    if i >= b.align_left and _is_num(text):
                        cls.append("num")
                    c = f' class="{" ".join(cls)}"' if cls else ""
                    tds.append(f"<td{c}>{_html_inline(text)}</td>")
                rows.append("<tr>" + "".join(tds) + "</tr>")
            out.append("<table>" + "".join(rows) + "</table>")
            if b.caption:
                out.append(f"<p class='caption'>{_html_inline(b.caption)}</p>")
    out.append("</body></html>")
    return "\n".join(out)
