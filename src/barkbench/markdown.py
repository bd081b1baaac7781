"""Markdown helpers of the report's text: numbers and percents as printed, escaping free text, pipe tables,
Quarto callouts. They know nothing about what the report says (`barkbench.fragments` does)."""
from __future__ import annotations

import math

import pandas as pd

MINUS = "\u2212"


def isnum(x) -> bool:
    return x is not None and not isinstance(x, (str, bool)) and not pd.isna(x) and not (
        isinstance(x, float) and math.isnan(x))


def fmt_num(x, digits: int = 2) -> str:
    return f"{round(float(x), digits) + 0.0:.{digits}f}" if isnum(x) else ""  # + 0.0: never "-0.0"


def fmt_pct(x, digits: int = 1) -> str:
    """Signed percent with a typographic minus, e.g. `−27.0 %`; empty for missing values."""
    if not isnum(x):
        return ""
    return "0 %" if float(x) == 0 else f"{float(x):+.{digits}f} %".replace("-", MINUS)


def md_escape(text) -> str:
    """Escape Markdown-active characters in free text taken from data (names, reasons)."""
    if isinstance(text, bool):
        return str(text).lower()
    if text is None or (not isinstance(text, str) and not isnum(text)):
        return ""
    s = " ".join(str(text).split())
    for ch in "\\`*_[]<>$@#~^":  # `|` is escaped by to_pipe_table
        s = s.replace(ch, "\\" + ch)
    return s


def to_pipe_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = ["" if (not isinstance(v, str) and pd.isna(v)) else " ".join(str(v).split()).replace("|", "\\|")
                 for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def callout(kind: str, title: str, body: str) -> str:
    return f'::: {{.callout-{kind} title="{title}"}}\n{body.strip()}\n:::\n'
