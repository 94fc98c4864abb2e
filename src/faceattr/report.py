"""One self-contained HTML page per run: settings, metrics with intervals, every picture, timings.

The page is built only from what the run folder holds (run.json, the fold histories, the PNGs, a
prediction summary), so `faceattr report RUN` can rebuild it at any time. Pictures are embedded
as data URIs: the file can be mailed or archived alone and opens without a network. The only
script is three lines that count loaded pictures, which the tests read back.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from faceattr.errors import FaceAttrError, percent, plural
from faceattr.outputs import write_text

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.headline { display: flex; gap: 1em; flex-wrap: wrap; margin: 1em 0; }
.metric { background: #f3f6f9; border-radius: 8px; padding: 0.6em 1em; min-width: 9em; }
.metric b { display: block; font-size: 1.5em; } .metric span { color: #555; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 3px 10px; text-align: right; }
th { background: #f3f6f9; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .muted { color: #777; }
"""

COUNT_LOADED = """
window.addEventListener("load", () => { const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length; });
"""


def pct(x: float | None) -> str:
    return "–" if x is None else percent(x)


def ci(rates: dict) -> str:
    low, high = rates.get("hter_ci", (None, None))
    return "" if low is None else f"95 % CI {pct(low)} – {pct(high)}"


def figure(path: Path, caption: str) -> str:
    """An <img> with the PNG inlined, or nothing when the picture was not made."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def metric(value: str, label: str) -> str:
    return f'<div class="metric"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def build_report(run: str | Path, shown: str | Path | None = None) -> Path:
    """Write RUN/report.html from the run folder's contents; return its path. The page names
    `shown` as the run's folder, if given: where a replacement run goes once it has finished."""
    run = Path(run)
    try:
        summary = json.loads((run / "run.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise FaceAttrError(f"{run} is not a faceattr run folder (run.json: {e})") from None
    try:
        cfg = summary.get("config", {})
        parts = [_overview(summary), _settings(summary), _data(run, summary)]
        parts.append(_training(run, summary))
        if summary.get("status") == "complete":
            parts.append(_evaluation(run, summary))
        prediction = run / "prediction" / "prediction.json"
        if prediction.exists():
            parts.append(_prediction(run, json.loads(prediction.read_text())))
        parts.append(_timings(summary))
    # A run.json (or prediction.json) edited by hand, or cut short: what train writes has them all.
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise FaceAttrError(
            f"{run}: run.json (or prediction/prediction.json) lacks what a report needs ({e!r})"
        ) from None
    title = f"faceattr run: {cfg.get('arch', '?')}, {cfg.get('folds', '?')} folds"
    where = str(Path(shown or run).resolve())
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{STYLE}</style><script>{COUNT_LOADED}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(where)}</p>"
        + "".join(parts)
        + "</body></html>"
    )
    return write_text(run / "report.html", page)


def _overview(s: dict) -> str:
    if s.get("status") != "complete":
        return section("Summary", "<p>The run has not finished: metrics appear when it has.</p>")
    oof, nested = s["oof"], s["oof_nested"]
    cards = "".join(
        [
            metric(pct(oof["hter"]), f"out-of-fold HTER ({ci(oof)})"),
            metric(pct(nested["hter"]), "HTER, threshold chosen on the other folds"),
            metric(f"{s['threshold']:.4f}", "decision threshold"),
            metric(pct(oof["far"]), "FAR (label 0 predicted 1)"),
            metric(pct(oof["frr"]), "FRR (label 1 predicted 0)"),
            metric(pct(s["eer"]), "equal error rate"),
            metric(f"{s['auc']:.4f}", "AUC"),
        ]
    )
    rows = [
        [name, pct(r["hter"]), ci(r), pct(r["far"]), pct(r["frr"])]
        for name, r in (
            ("at the chosen threshold", oof),
            ("threshold chosen on the other folds", nested),
            ("at 0.5", s["oof_at_0.5"]),
        )
    ]
    text = (
        f"<p>{s['n_train']:,} training images scored by the fold model that did not train on "
        f"them. HTER is the mean of FAR and FRR.</p>"
    )
    return section(
        "Summary",
        f"<div class='headline'>{cards}</div>{text}"
        + table(["out-of-fold", "HTER", "interval", "FAR", "FRR"], rows),
    )


def _settings(s: dict) -> str:
    rows = [[k, v] for k, v in s.get("config", {}).items()]
    env = [[k, v] for k, v in s.get("environment", {}).items()]
    return section(
        "Settings",
        f"<p>Data: {html.escape(str(s.get('data', '?')))}</p>"
        + table(["option", "value"], rows)
        + table(["environment", ""], env),
    )


def _data(run: Path, s: dict) -> str:
    counts = s.get("class_counts", {})
    n = sum(counts.values()) or 1
    rows = [[f"label {c}", f"{k:,}", pct(k / n)] for c, k in counts.items()]
    pics = "".join(
        [
            figure(run / "data" / "class_balance.png", "Images per class"),
            figure(run / "data" / "samples.png", "Random training images of each class"),
            figure(run / "data" / "audit.png", "Original sizes and colour modes"),
        ]
    )
    return section("Data", table(["class", "images", "share"], rows) + pics)


def _training(run: Path, s: dict) -> str:
    folds = s.get("folds", [])
    rows = [
        [
            f["fold"],
            f["best_epoch"],
            pct(f["val_hter"]),
            pct(f["val_far"]),
            pct(f["val_frr"]),
            f"{f['train_seconds']:.1f}",
        ]
        for f in folds
    ]
    body = table(["fold", "best epoch", "val HTER", "val FAR", "val FRR", "seconds"], rows)
    for f in folds:
        body += figure(
            run / f"fold_{f['fold']}" / "curves.png",
            f"Fold {f['fold']}: loss, HTER and learning rate per epoch",
        )
    return section("Training", body)


def _evaluation(run: Path, s: dict) -> str:
    out = run / "evaluation"
    pics = "".join(
        [
            figure(out / "roc_det.png", "ROC and DET curves, operating point marked"),
            figure(out / "threshold.png", "FAR, FRR and HTER against the threshold"),
            figure(out / "scores.png", "Out-of-fold scores per class"),
            figure(out / "confusion.png", "Confusion matrix at the chosen threshold"),
            figure(out / "worst_errors.png", "The most confidently wrong training images"),
        ]
    )
    return section("Out-of-fold evaluation", pics)


def _prediction(run: Path, p: dict) -> str:
    rows = [
        ["images", f"{p['images']:,}"],
        ["models", p["models"]],
        ["vote", p["vote"]],
        ["threshold", f"{p['threshold']:.4f}"],
        ["mirrored copies (TTA)", p["tta"]],
        ["predicted 0", f"{p['predicted_0']:,}"],
        ["predicted 1", f"{p['predicted_1']:,}"],
        ["soft and majority votes agree", pct(p["votes_agree"])],
        ["models unanimous", pct(p["unanimous"])],
        ["label file", p["output"]],
    ]
    pics = figure(run / "prediction" / "scores.png", "Ensemble scores on the test images")
    pics += figure(run / "prediction" / "agreement.png", "How many fold models voted 1")
    return section("Prediction", table(["", ""], rows) + pics)


def _timings(s: dict) -> str:
    t = s.get("timings", {})
    rows = [["decode images", f"{t.get('decode_s', 0):.1f} s"]]
    rows += [[f"train fold {i}", f"{x:.1f} s"] for i, x in enumerate(t.get("folds_s", []), 1)]
    # A resumed run's folds count the time of every invocation that trained them; total_s, the
    # last invocation's only: its decode and the folds it trained (or finished), no whole run.
    resumed = s.get("resumed", 0)
    times = plural(resumed, "time")
    whole = f"its last invocation (resumed {times})" if resumed else "whole run"
    rows += [[whole, f"{t.get('total_s', 0):.1f} s"]]
    return section("Timings", table(["step", "time"], rows))
