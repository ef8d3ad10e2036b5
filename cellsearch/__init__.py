"""cellsearch: ensemble and hyperparameter search for blood-cell image classification.

The whole job in three lines (a search on the embedded 28x28 PBC data, then an ensemble of its best
trials, saved and reloaded):

    >>> import cellsearch as cs
    >>> study = cs.search("quick")                       # doctest: +SKIP
    >>> ens = cs.build_ensemble(study)                   # doctest: +SKIP
    >>> ens.save("my_ensemble"); ens = cs.load_ensemble("my_ensemble")   # doctest: +SKIP
    >>> labels = ens.predict(images); proba = ens.predict_proba(images)  # doctest: +SKIP

`images` are uint8 arrays (N,H,W,3). Every error raised on purpose is a `cs.errors.CellsearchError`.
Importing this package does not import TensorFlow.
"""

from cellsearch import errors
from cellsearch._api import build_ensemble, load_ensemble, load_study, search
from cellsearch._study import Study
from search.location import StudyLocation
from search.spec import StudySpec, load_spec

__all__ = ["Study", "StudyLocation", "StudySpec", "build_ensemble", "errors", "load_ensemble", "load_spec",
           "load_study", "search"]
