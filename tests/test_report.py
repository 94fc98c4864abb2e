"""The HTML report: content from the run folder, and how it renders in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest

from conftest import cli, here
from faceattr.report import build_report, figure

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = [
    "summary",
    "settings",
    "data",
    "training",
    "out-of-fold-evaluation",
    "prediction",
    "timings",
]


@pytest.fixture(scope="module")
def predicted_run(trained_run, dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "label_val.txt"
    result = cli("predict", str(dataset_dir), "--run", str(trained_run), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"report: {trained_run / 'report.html'}" in result.stdout
    return trained_run


def test_report_holds_every_section_and_picture(predicted_run):
    page = (predicted_run / "report.html").read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # data: class balance, samples, audit; 2 fold curves; 5 evaluation; 2 prediction pictures
    assert len(images) == 3 + 2 + 5 + 2
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert "out-of-fold HTER" in page and "95 % CI" in page and "AUC" in page


def test_report_command_rebuilds_it(predicted_run, tmp_path):
    (predicted_run / "report.html").unlink()
    result = cli("report", str(predicted_run), "-q")  # -q and -v, as every command takes them
    assert result.returncode == 0 and result.stdout.startswith("wrote "), result.stderr
    assert (predicted_run / "report.html").exists()
    result = here("report", str(tmp_path))
    assert result.returncode == 2 and "not a faceattr run folder" in result.stderr


def test_unfinished_run_says_so(tmp_path):
    (tmp_path / "run.json").write_text('{"status": "running", "config": {"arch": "simple"}}')
    page = build_report(tmp_path).read_text()
    assert "has not finished" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_chromium_with_every_image_loaded(predicted_run, tmp_path):
    page = (predicted_run / "report.html").resolve().as_uri()
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = int(re.search(r'data-images="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-loaded="(\d+)"', body).group(1))
    assert total == 12 and loaded == total
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1280,4000", f"--screenshot={shot}", page],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        colours = im.convert("RGB").resize((64, 200)).getcolors(64 * 200)
        assert len(colours) > 50  # pictures and text, not a blank page


def rates(hter, far, frr, low, high):
    return {"hter": hter, "far": far, "frr": frr, "hter_ci": [low, high]}


def test_report_shows_each_number_where_it_belongs(tmp_path):
    summary = {
        "status": "complete",
        "config": {"arch": "simple", "folds": 2},
        "n_train": 100,
        "threshold": 0.4321,
        "eer": 0.0555,
        "auc": 0.9876,
        "oof": rates(0.10, 0.12, 0.08, 0.07, 0.13),
        "oof_nested": rates(0.20, 0.22, 0.18, 0.15, 0.25),
        "oof_at_0.5": rates(0.30, 0.32, 0.28, 0.26, 0.34),
        "class_counts": {"0": 25, "1": 75},
        "folds": [],
        "timings": {"total_s": 12.0},
        "resumed": 0,
    }
    (tmp_path / "run.json").write_text(json.dumps(summary))
    page = build_report(tmp_path).read_text()
    card = "<div class='metric'><b>{}</b><span>{}</span></div>".replace("'", '"')
    assert card.format("10.00 %", "out-of-fold HTER (95 % CI 7.00 % – 13.00 %)") in page
    assert card.format("20.00 %", "HTER, threshold chosen on the other folds") in page
    assert card.format("12.00 %", "FAR (label 0 predicted 1)") in page
    assert card.format("8.00 %", "FRR (label 1 predicted 0)") in page
    row = "<tr><td>at 0.5</td><td>30.00 %</td><td>95 % CI 26.00 % – 34.00 %</td>"
    assert row + "<td>32.00 %</td><td>28.00 %</td></tr>" in page
    assert "<tr><td>label 0</td><td>25</td><td>25.00 %</td></tr>" in page
    assert "<td>whole run</td><td>12.0 s</td>" in page
    (tmp_path / "run.json").write_text(json.dumps({**summary, "resumed": 2}))
    page = build_report(tmp_path).read_text()
    assert "<td>its last invocation (resumed 2 times)</td>" in page


def test_figures_embed_the_whole_picture(tmp_path):
    import base64

    (tmp_path / "a.png").write_bytes(b"\x89PNG not really, but every byte of it")
    html = figure(tmp_path / "a.png", "A")
    data = html.split("base64,", 1)[1].split('"', 1)[0]
    assert base64.b64decode(data) == (tmp_path / "a.png").read_bytes()
