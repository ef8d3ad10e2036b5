"""cellsearch: ensemble and hyperparameter search for blood-cell image classification.

The whole job in a few lines (a search on the embedded 28x28 PBC data, or on your own, then an ensemble of
its best trials, saved and reloaded):

    >>> import cellsearch as cs
    >>> study = cs.search("quick")                       # doctest: +SKIP
    >>> study = cs.search("quick", data="my_cells/")     # doctest: +SKIP
    >>> study.leaderboard()                              # doctest: +SKIP
    >>> ens = cs.build_ensemble(study)                   # doctest: +SKIP
    >>> ens.evaluate(images, labels)                     # doctest: +SKIP
    >>> ens.save("my_ensemble"); ens = cs.load_ensemble("my_ensemble")   # doctest: +SKIP
    >>> labels = ens.predict("new_cells/"); names = ens.class_names_[labels]  # doctest: +SKIP
    >>> cs.export_codabench(ens, "submission.zip")       # doctest: +SKIP

`data` is an .npz, a class-per-folder tree, a .csv of file names and labels, or `(images, labels)` arrays;
the classes come from it. `predict` takes uint8 arrays (N,H,W,3), image paths, a folder or PIL images.
Every error raised on purpose is a `cs.errors.CellsearchError`. Importing this package does not import
TensorFlow.
"""

from cellsearch import errors
from cellsearch._api import build_ensemble, export_codabench, load_ensemble, load_study, search
from cellsearch._study import Study
from search.study.location import StudyLocation
from search.study.spec import StudySpec, load_spec

__all__ = ["Study", "StudyLocation", "StudySpec", "build_ensemble", "errors", "export_codabench", "load_ensemble",
           "load_spec", "load_study", "search"]
