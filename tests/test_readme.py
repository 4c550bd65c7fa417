"""The README's recording example is real code: run it as written."""
from __future__ import annotations

import re
from pathlib import Path

import mpviz

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_recording_example_runs(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    run = mpviz.load_run(tmp_path / "runs" / "exp1")
    assert run.last_step == 49 and run.meta["status"] == "finished"
    assert run.meta["autocast_dtype"] == "float16" and run.steps["loss_scale"].notna().all()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make dashboard" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
