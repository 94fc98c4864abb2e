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


def test_metrics_are_the_label_files_and_the_confusion_matrix_too(tmp_path, monkeypatch):
    truth = write(tmp_path / "truth.txt", [0, 0, 1, 1, 1, 1])
    pred = write(tmp_path / "pred.txt", [0, 1, 1, 1, 1, 0])  # one error in each class
    rows = [(0.1, 0), (0.2, 0), (0.7, 1), (0.8, 1), (0.9, 1), (0.6, 1)]  # the soft vote: no errors
    table = tmp_path / "predictions.csv"
    table.write_text("image,soft_score,soft_label\n")
    with table.open("a") as f:
        f.writelines(f"{i}.jpg,{s},{v}\n" for i, (s, v) in enumerate(rows, 1))
    drawn = []
    monkeypatch.setattr(plots, "confusion", lambda y, p, path: drawn.append(p.tolist()) or path)
    result = evaluate(pred, truth, table, tmp_path / "ev")
    assert result["far"] == 0.5 and result["frr"] == 0.25 and result["hter"] == 0.375
    assert result["auc"] == 1.0 and result["eer"] == 0.0  # the scores' own, not the labels'
    assert drawn == [[0, 1, 1, 1, 1, 0]]  # once, and of --pred, as the warning says
    json.dumps(result)


def test_the_truth_needs_both_classes_and_the_files_must_agree(tmp_path):
    truth = write(tmp_path / "truth.txt", [1, 1, 1])
    with pytest.raises(FaceAttrError, match="holds label 1 only"):
        evaluate(write(tmp_path / "p.txt", [1, 1, 1]), truth)
    with pytest.raises(FaceAttrError, match=r"has 2 lines but .* has 3"):
        evaluate(write(tmp_path / "p.txt", [1, 0]), write(truth, [0, 1, 1]))
    assert evaluate(write(tmp_path / "p.txt", [0, 1, 1]), truth)["hter"] == 0.0


def test_scores_imply_the_threshold_of_their_labels(tmp_path):
    table = tmp_path / "predictions.csv"
    table.write_text("image,soft_score,soft_label\n1.jpg,0.2,0\n2.jpg,0.6,1\n3.jpg,0.9,1\n")
    scores, threshold = read_scores(table, 3)
    assert np.allclose(scores, [0.2, 0.6, 0.9]) and threshold == 0.6
    with pytest.raises(FaceAttrError, match="has 3 rows but the truth has 4"):
        read_scores(table, 4)
    table.write_text("image,soft_score,soft_label\n1.jpg,nan,0\n")
    with pytest.raises(FaceAttrError, match=r"probabilities in \[0, 1\]"):
        read_scores(table, 1)


def test_a_predictions_csv_cut_short_or_foreign_is_one_line(tmp_path):
    table = tmp_path / "predictions.csv"
    whole = "image,soft_score,soft_label\n1.jpg,0.2,0\n2.jpg,0.9,1\n"
    table.write_text(whole)
    assert read_scores(table, 2)[0].tolist() == [0.2, 0.9]
    for text in (whole[:-4], whole + "3.jpg," + "x" * 200_000 + "\n"):
        table.write_text(text)
        with pytest.raises(FaceAttrError, match=r"is not a predictions\.csv written by predict"):
            read_scores(table, 2)
