"""The HTML report: content from the run folder, and how it renders in headless Chromium."""

import re
import shutil
import subprocess

import pytest

from conftest import cli, here
from faceattr.report import build_report

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
