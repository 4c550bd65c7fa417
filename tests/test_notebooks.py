"""Each app notebook runs headless in a real Jupyter kernel (what JupyterLab does on "Run all").

nbclient executes every cell in `notebooks/` as the notebook's own folder (as Voila and
JupyterLab do) with `$MPVIZ_RUNS_DIR` pointing at a temporary runs folder holding two real runs;
the test fails on any error output and checks that the last cell displays the app widget.
Executed outputs are never written back (they would weigh megabytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import mpviz

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def test_the_three_apps_have_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"lab", "explorer", "compare"}
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        # Committed without outputs: a FigureWidget's saved state alone is ~5 MB.
        for cell in nb["cells"]:
            assert not cell.get("outputs"), f"{p.name}: clear outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_headless_and_displays_its_app(path, dash_two_runs, tmp_path, monkeypatch):
    root, _, _ = dash_two_runs
    # The lab writes a run only when Start is pressed, the tour trains its own: a folder of their own.
    runs = tmp_path if path.stem in ("lab", "tour") else root
    monkeypatch.setenv("MPVIZ_RUNS_DIR", str(runs))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", store_widget_state=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()   # raises CellExecutionError with the traceback on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"
              or (o.output_type == "stream" and o.name == "stderr" and "Traceback" in o.text)]
    assert not errors, errors
    shown = [o for o in outputs if o.output_type in ("display_data", "execute_result")
             and WIDGET_MIME in o.get("data", {})]
    assert shown, f"{path.name} displayed no widget; outputs: {outputs}"
    if path.stem == "lab":  # opening the lab trains nothing and claims no run directory
        assert list(runs.iterdir()) == []
    if path.stem == "tour":  # its five recorded runs, where the explorer lists them
        assert sorted(p.name for p in runs.iterdir()) == [
            "tour-mlp-lr5", "tour-policy", "tour-scaler", "tour-small-loss-scaled",
            "tour-small-loss-unscaled"]
        assert len(mpviz.list_runs(runs)) == 5
