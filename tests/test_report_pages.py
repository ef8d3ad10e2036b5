"""The report pages of the real tiny study (shared with test_ensemble_study.py): the study's index.html as the
search wrote it, and the ensemble's, with the ensemble against its members, the confidently wrong gallery and
the reliability diagram, both uploaded to the study's artifacts."""

from __future__ import annotations

import pandas as pd
import pytest
from optuna.artifacts import download_artifact, get_all_artifact_meta

from test_ensemble_robust import location  # noqa: F401  (shared fixtures)
from test_ensemble_study import study  # noqa: F401
from test_reports import page_images


@pytest.fixture(scope="module")
def paged(location, tmp_path_factory):  # noqa: F811
    from ensemble import build_ensemble

    out = tmp_path_factory.mktemp("paged") / "ens"  # topk, 2 TTA views: a quicker build than the other tests'
    return build_ensemble(location, top=2, method="topk", tta=2, out=str(out), quiet=True, progress=False)


def test_the_search_wrote_the_study_page(location):  # noqa: F811
    page = location.report_dir / "index.html"
    images = page_images(page, {"overview", "samples", "cleaning", "corruptions", "best", "files", "notes"})
    assert {"samples.png", "corruptions.png", "reliability.png", "robustness/robustness.png"} <= set(images)
    removed = pd.read_csv(location.cleaning_dir / "cleaning_report.csv").query("not kept")
    assert ("cleaning.png" in images) == (len(removed) > 0)
    assert len(removed) > 0 or "Cleaning removed nothing" in page.read_text()


def test_ensemble_page_shows_the_ensemble_against_its_members(paged, location, tmp_path):  # noqa: F811
    from ensemble.candidates import artifact_store, open_study

    report = paged.report_
    page = report.folder / "report" / "index.html"
    images = page_images(page, {"overview", "robustness", "samples", "wrong", "calibration", "files", "notes"})
    assert set(images) == {"robustness.png", "heldout_examples.png", "samples.png", "confidently_wrong.png",
                           "reliability.png"}
    assert images["robustness.png"].width > 2.5 * images["robustness.png"].height  # by family | against members
    text = page.read_text()
    for member in paged.member_names:
        assert f"<th>{member}</th>" in text  # a column of the severity table
    assert f"<td>{report.score('test'):.4f}</td>" in text  # the ensemble's clean accuracy, first row of it
    assert "report/index.html" in paged.manifest_["files"]  # checksummed with the artifact

    searched = open_study(location)  # the page and its picture are study artifacts, next to the study's own page
    listed = [m.filename for m in get_all_artifact_meta(searched)]
    assert listed.count("ensemble_index.html") == 1  # every build of the session rewrote the same artifact
    assert "index.html" in listed
    metas = {m.filename: m for m in get_all_artifact_meta(searched)}
    assert {"ensemble_confidently_wrong.png", "ensemble_reliability.png", "ensemble_samples.png"} <= set(listed)
    for name in ("index.html", "robustness.png"):
        download_artifact(artifact_store=artifact_store(location), file_path=str(tmp_path / name),
                          artifact_id=metas[f"ensemble_{name}"].artifact_id)
        assert (tmp_path / name).read_bytes() == (page.parent / name).read_bytes()
    assert searched.user_attrs["artifact:report/ensemble_index.html"] == metas["ensemble_index.html"].artifact_id
