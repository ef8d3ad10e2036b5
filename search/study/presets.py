"""The shipped study specs and what each is for: the first line of each file's header comment."""

from __future__ import annotations

from search.study.spec import STUDIES_DIR


def shipped_specs() -> dict[str, str]:
    """Spec name -> the first line of its header comment, for every `.toml` shipped in the `studies` package."""
    found = {}
    for path in sorted(STUDIES_DIR.iterdir(), key=lambda p: p.name):
        if path.name.endswith(".toml"):
            header = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")),
                          "#")
            found[path.name[:-5]] = header.lstrip("#").strip().rstrip(",;")
    return found
