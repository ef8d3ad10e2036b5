"""The one-page HTML report (`index.html`) of a study or an ensemble, written beside the files it shows.

Images are embedded as base64 data URIs, so the page is complete on its own: opened from disk, downloaded
from optuna-dashboard as one artifact, or mailed, it needs no network and no neighbouring file. Each image
also links to its PNG beside the page, and every other file of the report is linked by relative path.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.atomic import atomic_write_text

PAGE_NAME = "index.html"
STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right}th{background:#f3f3f3}figure{margin:.8em 0}img{max-width:100%;height:auto;
border:1px solid #eee}figcaption,.note{font-size:.9em;color:#555}.note{background:#fafae8;padding:.3em .6em}
nav a{margin-right:1em}"""


@dataclass
class Section:
    """One `<section id=...>` of the page: a heading and HTML parts in order."""

    id: str
    title: str
    parts: list[str] = field(default_factory=list)


@dataclass
class ReportPage:
    """Collects sections, then writes `folder/index.html`. Image and file paths are relative to `folder`."""

    folder: Path
    title: str
    sections: list[Section] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)  # the PNG files embedded so far

    def section(self, id: str, title: str) -> Section:
        self.sections.append(Section(id, title))
        return self.sections[-1]

    def image(self, section: Section, name: str, caption: str) -> None:
        """Embed the PNG `folder/name`, linked to the file itself."""
        self.images.append(self.folder / name)
        data = base64.b64encode(self.images[-1].read_bytes()).decode("ascii")
        section.parts.append(f'<figure><a href="{html.escape(name)}"><img src="data:image/png;base64,{data}" '
                             f'alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}</figcaption>'
                             "</figure>")

    @staticmethod
    def note(section: Section, text: str) -> None:
        section.parts.append(f'<p class="note">{html.escape(text)}</p>')

    @staticmethod
    def text(section: Section, text: str) -> None:
        section.parts.append(f"<p>{html.escape(text)}</p>")

    @staticmethod
    def table(section: Section, frame: pd.DataFrame, digits: int = 4) -> None:
        section.parts.append(frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.{digits}f}",
                                           na_rep="", escape=True))

    def links(self, section: Section, files: list[Path]) -> None:
        """A list of links to `files` (inside `folder`), by their relative paths."""
        names = [Path(f).relative_to(self.folder).as_posix() for f in files]
        items = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in names)
        section.parts.append(f"<ul>{items}</ul>")

    def render(self) -> str:
        nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in self.sections)
        body = "".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{"".join(s.parts)}</section>'
                       for s in self.sections)
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1><nav>{nav}</nav>"
                f"{body}</body></html>\n")

    def write(self) -> Path:
        path = self.folder / PAGE_NAME
        atomic_write_text(path, self.render())
        return path
