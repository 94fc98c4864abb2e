"""evaluate: the metrics of a label file against the truth, and the pictures of predict's scores."""

import json

import numpy as np
import pytest

from faceattr import plots
from faceattr.errors import FaceAttrError
from faceattr.evaluate import evaluate, read_scores


def write(path, lines):
    path.write_text("".join(f"{v}\n" for v in lines))
    return path


def write_table(path, rows, written):
    """A predictions.csv of (soft_score, soft_label) rows whose label file held `written`."""
    pairs = zip(rows, written, strict=True)
    lines = [f"{i}.jpg,{s},{v},{w}" for i, ((s, v), w) in enumerate(pairs, 1)]
    path.write_text("\n".join(["image,soft_score,soft_label,label", *lines]) + "\n")
    return path


def test_metrics_are_the_label_files_and_the_confusion_matrix_too(tmp_path, monkeypatch, caplog):
    truth = write(tmp_path / "truth.txt", [0, 0, 1, 1, 1, 1])
    pred = write(tmp_path / "pred.txt", [0, 1, 1, 1, 1, 0])  # one error in each class
    rows = [(0.1, 0), (0.2, 0), (0.7, 1), (0.8, 1), (0.9, 1), (0.6, 1)]  # the soft vote: no errors
    table = write_table(tmp_path / "predictions.csv", rows, [0, 1, 1, 1, 1, 0])  # majority's
    drawn = []
    monkeypatch.setattr(plots, "confusion", lambda y, p, path: drawn.append(p.tolist()) or path)
    result = evaluate(pred, truth, table, tmp_path / "ev")
    assert result["far"] == 0.5 and result["frr"] == 0.25 and result["hter"] == 0.375
    assert result["auc"] == 1.0 and result["eer"] == 0.0  # the scores' own, not the labels'
    assert drawn == [[0, 1, 1, 1, 1, 0]]  # once, and of --pred, as the warning says
    assert "differs from the soft vote of" in caplog.text and "on 2 image(s)" in caplog.text
    json.dumps(result)


def test_the_truth_needs_both_classes_and_the_files_must_agree(tmp_path):
    truth = write(tmp_path / "truth.txt", [1, 1, 1])
    with pytest.raises(FaceAttrError, match="holds label 1 only"):
        evaluate(write(tmp_path / "p.txt", [1, 1, 1]), truth)
    with pytest.raises(FaceAttrError, match=r"has 2 lines but .* has 3"):
        evaluate(write(tmp_path / "p.txt", [1, 0]), write(truth, [0, 1, 1]))
    assert evaluate(write(tmp_path / "p.txt", [0, 1, 1]), truth)["hter"] == 0.0


def test_scores_imply_the_threshold_of_their_labels(tmp_path):
    table = write_table(tmp_path / "predictions.csv", [(0.2, 0), (0.6, 1), (0.9, 1)], [0, 0, 1])
    scores, threshold, written = read_scores(table, 3)
    assert np.allclose(scores, [0.2, 0.6, 0.9]) and threshold == 0.6
    assert written.tolist() == [0, 0, 1]
    with pytest.raises(FaceAttrError, match="has 3 rows but the truth has 4"):
        read_scores(table, 4)
    write_table(table, [("nan", 0)], [0])
    with pytest.raises(FaceAttrError, match=r"probabilities in \[0, 1\]"):
        read_scores(table, 1)


def test_a_predictions_csv_cut_short_or_foreign_is_one_line(tmp_path):
    table = tmp_path / "predictions.csv"
    whole = write_table(table, [(0.2, 0), (0.9, 1)], [0, 1]).read_text()
    assert read_scores(table, 2)[0].tolist() == [0.2, 0.9]
    no_label = "image,soft_score,soft_label\n1.jpg,0.2,0\n2.jpg,0.9,1\n"
    for text in (whole[:-4], whole + "3.jpg," + "x" * 200_000 + "\n", no_label):
        table.write_text(text)
        with pytest.raises(FaceAttrError, match=r"is not a predictions\.csv written by predict"):
            read_scores(table, 2)


def test_a_label_file_from_another_predict_is_refused(tmp_path):
    """A second predict into the folder replaces predictions.csv: an older label file beside it
    would be scored against the new scores' pictures."""
    truth = write(tmp_path / "truth.txt", [0, 1, 1])
    table = write_table(tmp_path / "predictions.csv", [(0.1, 0), (0.7, 1), (0.9, 1)], [0, 1, 1])
    assert evaluate(write(tmp_path / "p.txt", [0, 1, 1]), truth, table, tmp_path / "ev")["auc"]
    with pytest.raises(
        FaceAttrError,
        match=r"is not the label file predict wrote with .*: they "
        r"differ on 2 of 3 images; give both from the same predict",
    ):
        evaluate(write(tmp_path / "p.txt", [1, 0, 1]), truth, table, tmp_path / "ev2")
    assert not (tmp_path / "ev2").exists()


def test_plots_in_a_run_or_among_images_are_refused(tmp_path):
    """In a run, they had replaced the out-of-fold pictures its report shows; among test
    images, they had stopped every later command at "image name is not a number"."""
    truth = write(tmp_path / "truth.txt", [0, 1, 1])
    table = write_table(tmp_path / "predictions.csv", [(0.1, 0), (0.7, 1), (0.9, 1)], [0, 1, 1])
    pred = write(tmp_path / "p.txt", [0, 1, 1])
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    for plots_dir in (run / "evaluation", run, run / "evaluation" / "new"):
        with pytest.raises(FaceAttrError, match=rf"--plots .* is inside the run {run}, whose"):
            evaluate(pred, truth, table, plots_dir)
    assert list((run / "evaluation").iterdir()) == []
    (tmp_path / "val_img").mkdir()
    (tmp_path / "val_img" / "1.jpg").write_bytes(b"")
    with pytest.raises(FaceAttrError, match="holds images, which the pictures would join"):
        evaluate(pred, truth, table, tmp_path / "val_img")
    assert [p.name for p in (tmp_path / "val_img").iterdir()] == ["1.jpg"]
