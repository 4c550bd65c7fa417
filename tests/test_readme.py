"""The README's code is real code: every ```python block runs, as written.

Blocks are read like a reader reads them: in order, each one continuing the ones above it (the
steering block uses `torch`, `nn` and `mpviz` from the recording block). So they run once per
session, in order, in one namespace, in a fresh temporary folder (the examples write `runs/`
there); each block's test reports its own outcome. A block added to the README is picked up by
itself. ```bash blocks are not run.
"""
from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import mpviz

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks() -> list[tuple[str, int, str]]:
    """(section heading, first line number, code) of every ```python block, in order."""
    text = README.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(1).lower() not in ("python", "py"):
            continue
        before = text[:m.start()]
        headings = re.findall(r"^#+ +(.+)$", before, re.M)
        first_line = before.count("\n") + 2   # the line after the opening fence
        blocks.append((headings[-1] if headings else "(top)", first_line, m.group(2)))
    return blocks


BLOCKS = python_blocks()


@dataclass
class ReadmeRun:
    cwd: Path
    after: list[dict] = field(default_factory=list)   # the namespace after each block that ran
    error: tuple[int, str] | None = None              # (block index, traceback) of the first failure


@pytest.fixture(scope="module")
def readme(tmp_path_factory) -> ReadmeRun:
    result = ReadmeRun(tmp_path_factory.mktemp("readme"))
    scope: dict = {"__name__": "__readme__"}
    old = os.getcwd()
    os.chdir(result.cwd)
    try:
        for i, (_, line, code) in enumerate(BLOCKS):
            try:   # padding keeps README line numbers in tracebacks
                exec(compile("\n" * (line - 1) + code, str(README), "exec"), scope)
            except Exception:
                result.error = (i, traceback.format_exc())
                break
            result.after.append(dict(scope))
    finally:
        os.chdir(old)
    return result


def block_index(heading: str) -> int:
    found = [i for i, (h, _, _) in enumerate(BLOCKS) if h.startswith(heading)]
    assert found, f"README has no python block under a heading starting {heading!r}"
    return found[0]


def namespace_after(readme: ReadmeRun, k: int) -> dict:
    if k >= len(readme.after):
        i, tb = readme.error
        _, line, _ = BLOCKS[i]
        pytest.fail(f"README block {i} (line {line}) failed:\n{tb}", pytrace=False)
    return readme.after[k]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, [h for h, _, _ in BLOCKS]


@pytest.mark.parametrize("k", range(len(BLOCKS)),
                         ids=[f"{i}-line{line}-{h[:30]}" for i, (h, line, _) in enumerate(BLOCKS)])
def test_readme_python_block_runs(k, readme):
    namespace_after(readme, k)


def test_readme_recording_example_records_what_it_says(readme):
    namespace_after(readme, block_index("Record a training loop"))
    run = mpviz.load_run(readme.cwd / "runs" / "exp1")
    assert run.last_step == 49 and run.meta["status"] == "finished"
    assert run.meta["autocast_dtype"] == "float16" and run.steps["loss_scale"].notna().all()
    run.close()


def test_readme_steering_example_does_what_its_comments_say(readme):
    import torch

    ns = namespace_after(readme, block_index("Steer precision per layer"))
    model, policy = ns["model"], ns["policy"]
    table = mpviz.explain_policy(model, policy).set_index("layer")
    norms = [n for n in table.index if re.fullmatch(r"encoder\.layers\.\d+\.norm\d", n)]
    assert len(norms) == 4 and (table.loc[norms, "precision"] == "fp32").all()   # the glob
    assert table.loc["head", "precision"] == "bf16" and table.loc["head", "rule"] == "*"
    # After handle.remove() and the Recorder, the model is as before: fp32 out, no hooks left.
    assert model(torch.randn(2, 8, 32)).dtype == torch.float32
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # The Recorder applied the policy and recorded the switch of head at the step after i == 9.
    run = mpviz.load_run(readme.cwd / "runs" / "steer")
    changes = run.policy_changes
    assert changes[changes["layer"] == "head"][["step", "precision"]].values.tolist() == [
        [0, "bf16"], [10, "fp32"]]
    assert run.last_step == 19 and run.meta["status"] == "finished"
    run.close()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make dashboard" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
