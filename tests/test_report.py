"""`mpviz report`: one self-contained HTML file of a run (mpviz/report.py).

Real runs (an fp16 MLP at lr 5 that overflows, skips steps and gets a precision change), a long
run written with the store's own writer, the HTML's numbers checked against the run, its size
against the README's bound, and the file opened in Chromium with every request but the file
itself blocked.
"""
from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mpviz
from mpviz.dashboard import queries
from mpviz.report import MAX_HOVER, MAX_MARKS, MAX_POINTS, write_report
from mpviz.store import COLUMNS, RunWriter, db_path

from helpers.browser import offline  # (the `browser` fixture: tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
BOUND_MB = 5.5   # the README's "about 5 MB (at most 5.5 MB) whatever the run length"


def figure(path: Path) -> dict:
    """The report's figure spec, as the page hands it to Plotly.newPlot."""
    m = re.search(r'<script type="application/json" id="mpviz-figure-data">(.*?)</script>',
                  path.read_text(encoding="utf-8"), re.S)
    return json.loads(m.group(1))


def trace(spec: dict, meta: str) -> dict:
    return next(t for t in spec["data"] if t.get("meta") == meta)


def nums(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """`python -m mpviz demo --task mlp --precision fp16 --lr 5`: fc3 overflows in the forward
    from step 1, GradScaler skips every step after; fc3 is set to fp32 at step 20."""
    from mpviz.demos import Trainer

    run_dir = tmp_path_factory.mktemp("report") / "mlp-fp16"
    with Trainer(task="mlp", precision="fp16", lr=5.0, seed=0, run_dir=str(run_dir), every=5) as t:
        for i in range(30):
            t.step()
            if i == 19:
                t.recorder.set_precision({"fc3": "fp32"})
    return run_dir


def long_name(i: int) -> str:
    return f"encoder.layers.{(i - 1) // 5}.self_attention_block.output_projection_dense_{(i - 1) % 5}"


def write_long_run(run_dir: Path, steps: int, layers: int = 100, every: int = 20) -> None:
    """A long fp16 run through the store's writer (as benchmarks/large_run.py does), as heavy
    as a report gets: long layer names, every 3rd step skipped, a precision change every 5
    steps, every 7th loss nan (inf in the second half: every point of it is marked), gradient
    norms of every layer every `every` steps (a full heatmap)."""
    names = [(0, "", "Model", 0, "float32", 0, 0)] + [
        (i, long_name(i), "Linear", 4096, "float32", 4, 1) for i in range(1, layers)]
    w = RunWriter(db_path(run_dir), {"model": "Synthetic", "device": "cpu", "every": every,
                                     "status": "running", "autocast_dtype": "float16",
                                     "scaler": {"enabled": True}, "start_time": time.time()},
                  names, flush_every_s=2.0)
    w.put("dtypes", [(0, i, t, d) for i in range(layers) for t, d in
                     (("input", "float32"), ("output", "float16"), ("weight", "float32"),
                      ("grad", "float32"))])
    n_over = len(COLUMNS["overflows"])
    for s0 in range(0, steps, 5000):
        rows, over, stats, changes = [], [], [], []
        for s in range(s0, min(s0 + 5000, steps)):
            skipped = s % 3 == 1
            loss = ((float("inf") if 2 * s >= steps else float("nan")) if s % 7 == 3
                    else 2.0 + math.sin(s / 500))
            rows.append((s, loss, 2.0 ** (16 - s % 9), 2.0 ** (16 - s % 9), int(skipped),
                         int(skipped), 0.05, 32, 600.0 + s % 50, time.time()))
            if skipped:
                over += [(s, 1 + (s + j) % (layers - 1), "grad", "backward", int(j == 0), 12, 1, 1)[:n_over]
                         for j in range(3)]
            if s % 5 == 0:
                changes += [(s, 1 + (s + j) % (layers - 1), "fp32" if s % 10 else "fp16", "x")
                            for j in range(8)]
            if s % every == 0:
                stats += [(s, i, "grad", "float32", 1e-3 * (1 + i) * (1 + s % 13), 1.0, 1e-6, 0, 0,
                           10, 0, 0, 0, 4096) for i in range(layers)]
        for table, r in (("steps", rows), ("overflows", over), ("layer_stats", stats),
                         ("policy_changes", changes)):
            w.put(table, r)
        w.flush()
    w.set_meta(status="finished", end_time=time.time())
    w.close()
    assert not w.errors


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "long"
    write_long_run(run_dir, steps=30_000)
    return run_dir


@pytest.fixture(scope="module")
def fp16_html(fp16_run, tmp_path_factory):
    return write_report(fp16_run, tmp_path_factory.mktemp("html") / "fp16.html")


@pytest.fixture(scope="module")
def long_html(long_run, tmp_path_factory):
    return write_report(long_run, tmp_path_factory.mktemp("html") / "long.html")


def test_report_holds_the_runs_numbers(fp16_run, fp16_html):
    run = mpviz.load_run(fp16_run)
    try:
        steps, overflows, changes, meta = run.steps, run.overflows, run.policy_changes, run.meta
        diagnosis = mpviz.diagnose(run)
    finally:
        run.close()
    text = fp16_html.read_text(encoding="utf-8")
    spec = figure(fp16_html)
    # 30 steps: no decimation, the loss trace is run.steps' loss (nan: a gap, null)
    loss = trace(spec, "loss")
    assert loss["x"] == steps["step"].tolist()
    np.testing.assert_array_equal(nums(loss["y"]), steps["loss"].astype(float).to_numpy())
    assert steps["loss"].isna().sum() >= 20   # the run went nan ...
    bad = trace(spec, "nonfinite")            # ... and each nan step is marked
    assert bad["x"] == steps.loc[steps["loss"].isna(), "step"].tolist()
    # skipped steps on the loss-scale line, each with its culprit layer
    skips = trace(spec, "skips")
    assert skips["x"] == steps.loc[steps["skipped"], "step"].tolist() and len(skips["x"]) >= 20
    np.testing.assert_allclose(2.0 ** nums(skips["y"]),
                               steps.loc[steps["skipped"], "loss_scale"].to_numpy())
    firsts = overflows[overflows["first"]]
    culprit = firsts["layer"].iloc[0]
    assert culprit == "fc3" and any(h.startswith("fc3 activation (forward)") for h in skips["hovertext"])
    np.testing.assert_allclose(2.0 ** nums(trace(spec, "scale")["y"]), steps["loss_scale"].to_numpy())
    np.testing.assert_allclose(nums(trace(spec, "speed")["customdata"]),
                               steps["samples_per_s"].to_numpy())
    # the precision change: a star at step 20 naming the layer, and the table row
    marks = trace(spec, "marks")
    assert changes["step"].tolist() == [20] and marks["x"] == [20]
    assert marks["hovertext"] == ["fc3 → fp32"]
    assert re.search(r"<td>20</td><td>fc3</td><td>fp32</td>", text)
    # dtype map and gradient heatmap
    dt = trace(spec, "dtypes")
    assert dt["y"] == ["fc1", "act1", "fc2", "act2", "fc3", "act3", "head"]
    assert dt["text"][4] == ["fp32"] * 4 and dt["text"][0][1] == "fp16"   # fc3 after the change
    assert trace(spec, "grads")["y"] == ["fc1", "fc2", "fc3", "head"]
    # diagnosis: every finding's kind and message; advice; overflow culprit; metadata
    kinds = {f.kind for f in diagnosis.findings}
    assert {"forward_overflow", "nonfinite_loss", "scale_collapse"} <= kinds
    for f in diagnosis.findings:
        assert f'data-kind="{f.kind}"' in text
        assert html.escape(f.message) in text
    assert "mpviz.advise" in text and "&#x27;fc3&#x27;: &#x27;fp32&#x27;" in text
    assert re.search(r"<td>1</td><td>2\^16</td><td>fc3 activation \(forward\), head grad", text)
    for key in ("torch_version", "autocast_dtype", "scaler", "lr"):
        assert f"<code>{key}</code>" in text
    assert f"<td>{meta['torch_version']}</td>" in text and "<td>5.0</td>" in text
    # self-contained: plotly.js inline, nothing loaded from elsewhere
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)


def test_report_diagnoses_the_run_once(fp16_run, monkeypatch):
    """The diagnosis the report shows is the one its advice is made from: the run is
    diagnosed once (on a long run that takes a second)."""
    from mpviz.report import report_html

    real, calls = mpviz.diagnose, []

    def counted(run):
        calls.append(run)
        return real(run)

    monkeypatch.setattr(mpviz, "diagnose", counted)
    monkeypatch.setattr(sys.modules["mpviz.diagnosis.advise"], "diagnose", counted)
    text = report_html(fp16_run)
    assert len(calls) == 1
    assert "mpviz.advise" in text and "&#x27;fc3&#x27;: &#x27;fp32&#x27;" in text


def test_long_run_is_decimated_and_bounded(long_run, long_html):
    size_mb = long_html.stat().st_size / 2 ** 20
    print(f"report of a 30,000-step x 100-layer run: {size_mb:.2f} MB")
    assert size_mb <= BOUND_MB
    spec = figure(long_html)
    run = mpviz.load_run(long_run)
    try:
        steps = run.steps
    finally:
        run.close()
    # the loss line is the bucket means of run.steps (nan ignored, as SQL AVG does; inf: a gap)
    k = queries.bucket_size(0, len(steps) - 1, MAX_POINTS)
    assert k > 1
    want = steps.assign(loss=steps["loss"].astype(float)).groupby(steps["step"] // k)
    mean = want["loss"].mean().to_numpy(copy=True)
    mean[~np.isfinite(mean)] = np.nan
    loss = trace(spec, "loss")
    assert loss["x"] == want["step"].min().tolist() and len(loss["x"]) == MAX_POINTS
    np.testing.assert_allclose(nums(loss["y"]), mean, rtol=1e-12)
    assert np.isfinite(mean[:MAX_POINTS // 2]).all() and np.isnan(mean[MAX_POINTS // 2:]).all()
    assert len(trace(spec, "nonfinite")["x"]) == MAX_POINTS // 2
    # 10,000 skipped steps and 6,000 steps with precision changes, one mark per bucket
    skips, marks = trace(spec, "skips"), trace(spec, "marks")
    assert int(steps["skipped"].sum()) == 10_000
    assert len(skips["x"]) == len(marks["x"]) == MAX_MARKS
    assert skips["hovertext"][0].startswith(f"10 skipped steps 1–28; first: {long_name(2)} grad (backward)")
    assert max(map(len, skips["hovertext"] + marks["hovertext"])) == MAX_HOVER
    heat = trace(spec, "grads")
    assert len(heat["y"]) * len(heat["x"]) == queries.MAX_HEATMAP_CELLS   # full, capped


def test_cli_writes_the_report(fp16_run, tmp_path):
    out = tmp_path / "out.html"
    p = subprocess.run([sys.executable, "-m", "mpviz", "report", str(fp16_run), "-o", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}" in p.stdout and out.stat().st_size > 4 * 2 ** 20
    assert trace(figure(out), "loss")["x"] == list(range(30))
    p = subprocess.run([sys.executable, "-m", "mpviz", "report", str(tmp_path / "nope")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no run at" in p.stderr


@pytest.mark.parametrize("which", ["fp16_html", "long_html"])
def test_report_renders_offline(browser, which, request):
    path = request.getfixturevalue(which)
    with offline(browser, path, viewport={"width": 1200, "height": 900}) as (page, requests, errors):
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
            .map(g => g.data.map(t => [t.meta, t.x ? t.x.length : 0]))""")
        n_svg = page.evaluate("document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length")
        n_heat = page.evaluate("document.querySelectorAll('.js-plotly-plot .heatmaplayer image, "
                               ".js-plotly-plot .hm image').length")
    assert errors == []
    assert requests == [path.as_uri()]
    assert len(drawn) == 1   # one figure: plotly.js embedded once
    counts = dict(drawn[0])
    assert {"loss", "scale", "skips", "speed", "dtypes", "grads"} <= set(counts)
    assert counts["loss"] > 0 and counts["skips"] > 0 and counts["grads"] > 0
    assert n_svg >= 5 and n_heat == 2
