"""Where a study lives: its storage URL, artifact store, folder, and the files and folders inside it.

Every piece of code that needs a study's storage, artifacts, report folder, trial scratch folder or the
last-study pointer asks one `StudyLocation` instead of rebuilding the paths.

    >>> loc = StudyLocation(name="default", out="runs")
    >>> loc.storage
    'sqlite:///runs/default/study.db'
    >>> loc.trial_work_dir(7).as_posix()
    'runs/default/work/trial_00007'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write_text
from common.errors import StudyNotFoundError

POINTER_FILE = "last_study.json"


@dataclass(frozen=True)
class StudyLocation:
    """A study's name, output root, storage URL and artifact store.

    `storage` defaults to SQLite at `<out>/<name>/study.db` and `artifacts` to `<out>/<name>/artifacts`;
    give a database URL (`postgresql://...`) or `s3://bucket/prefix` when workers share no disk.
    """

    name: str
    out: str = "runs"
    storage: str = field(default="")
    artifacts: str = field(default="")

    def __post_init__(self) -> None:
        if not self.storage:
            object.__setattr__(self, "storage", f"sqlite:///{(self.folder / 'study.db').as_posix()}")
        if not self.artifacts:
            object.__setattr__(self, "artifacts", str(self.folder / "artifacts"))

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.name

    @property
    def report_dir(self) -> Path:
        return self.folder / "report"

    @property
    def split_file(self) -> Path:
        return self.folder / "split.json"

    @property
    def cleaning_dir(self) -> Path:
        return self.folder / "cleaning"

    @property
    def removed_ids_file(self) -> Path:
        """Ids of the images cleaning removed; every trial drops them before splitting."""
        return self.cleaning_dir / "removed_ids.json"

    @property
    def spec_file(self) -> Path:
        return self.folder / "spec.json"

    @property
    def logs_dir(self) -> Path:
        return self.folder / "logs"

    @property
    def ray_dir(self) -> Path:
        return self.folder / "ray"

    @property
    def ensemble_dir(self) -> Path:
        return self.folder / "ensemble"

    @property
    def compile_cache_dir(self) -> Path:
        """JAX's persistent compilation cache, shared by every study under the same output root."""
        return Path(self.out) / "jax_cache"

    @property
    def refit_dir(self) -> Path:
        """The build's refit trainings, kept so that building again reuses them."""
        return self.folder / "refit"

    def trial_work_dir(self, number: int) -> Path:
        """Scratch folder of one trial; removed once its files are in the artifact store."""
        return self.folder / "work" / f"trial_{number:05d}"

    def dashboard_command(self) -> str:
        artifacts = f" --artifact-dir {self.artifacts}" if "://" not in self.artifacts else ""
        return f"optuna-dashboard {self.storage}{artifacts}"

    def remember(self) -> None:
        """Record this study as the last one run under `out`, so a later build needs no flags."""
        pointer = {"study": self.name, "storage": self.storage, "artifacts": self.artifacts}
        atomic_write_text(Path(self.out) / POINTER_FILE, json.dumps(pointer, indent=2))

    @classmethod
    def find(cls, name: str | None = None, *, out: str | os.PathLike = "runs", storage: str | None = None,
             artifacts: str | None = None, pointer: str | os.PathLike | None = None) -> "StudyLocation":
        """Given values win; missing ones come from `<out>/last_study.json` (or the `pointer` file, whose
        folder is then the output root) when it names the same study (or no study was named), else from the
        defaults under `<out>/<name>/`."""
        pointer = Path(pointer) if pointer is not None else Path(out) / POINTER_FILE
        out = pointer.parent
        saved: dict = {}
        if pointer.is_file():
            try:
                saved = json.loads(pointer.read_text())
            except json.JSONDecodeError as exc:
                raise StudyNotFoundError(f"{pointer}: not valid JSON ({exc})") from None
        if name is None and not saved:
            raise StudyNotFoundError(f"no study given and no {pointer} (run `python -m search.run` first, or "
                                     "pass --study/--storage)")
        name = name or saved["study"]
        same = saved.get("study") == name
        return cls(name=name, out=str(out), storage=storage or (saved.get("storage", "") if same else ""),
                   artifacts=artifacts or (saved.get("artifacts", "") if same else ""))
