"""The README's code is real code: every ```python block runs, as written, on its own.

A reader copies one block, not the whole page: each block runs alone, in a fresh namespace, in
its own fresh temporary folder (the examples write `runs/` there), so a block that uses a name
(or a run) only an earlier block made fails here with its NameError. Each block runs once per
session; each block's test reports its own outcome. A block added to the README is picked up by
itself. ```bash blocks are not run.
"""
from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
class BlockRun:
    cwd: Path                      # the folder it ran in
    namespace: dict                # its namespace afterwards
    error: str | None = None       # the traceback, if it raised


def run_alone(k: int, cwd: Path) -> BlockRun:
    """Block k, alone: a fresh namespace, `cwd` as the working folder."""
    _, line, code = BLOCKS[k]
    result = BlockRun(cwd, {"__name__": "__readme__"})
    old = os.getcwd()
    os.chdir(cwd)
    try:   # padding keeps README line numbers in tracebacks
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), result.namespace)
    except Exception:
        result.error = traceback.format_exc()
    finally:
        os.chdir(old)
    return result


@pytest.fixture(scope="module")
def readme(tmp_path_factory) -> Callable[[int], BlockRun]:
    """readme(k): block k's run, alone, each block once per session."""
    done: dict[int, BlockRun] = {}

    def run(k: int) -> BlockRun:
        if k not in done:
            done[k] = run_alone(k, tmp_path_factory.mktemp(f"readme-block{k}"))
        return done[k]
    return run


def block_index(heading: str) -> int:
    found = [i for i, (h, _, _) in enumerate(BLOCKS) if h.startswith(heading)]
    assert found, f"README has no python block under a heading starting {heading!r}"
    return found[0]


def ran(readme: Callable[[int], BlockRun], k: int) -> BlockRun:
    result = readme(k)
    if result.error is not None:
        _, line, _ = BLOCKS[k]
        pytest.fail(f"README block {k} (line {line}) failed when run on its own:\n{result.error}",
                    pytrace=False)
    return result


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, [h for h, _, _ in BLOCKS]


@pytest.mark.parametrize("k", range(len(BLOCKS)),
                         ids=[f"{i}-line{line}-{h[:30]}" for i, (h, line, _) in enumerate(BLOCKS)])
def test_readme_python_block_runs_on_its_own(k, readme):
    ran(readme, k)


def test_readme_recording_example_records_what_it_says(readme):
    block = ran(readme, block_index("Record a training loop"))
    run = mpviz.load_run(block.cwd / "runs" / "exp1")
    assert run.last_step == 49 and run.meta["status"] == "finished"
    assert run.meta["autocast_dtype"] == "float16" and run.steps["loss_scale"].notna().all()
    run.close()


def test_readme_steering_example_does_what_its_comments_say(readme):
    import torch

    block = ran(readme, block_index("Steer precision per layer"))
    model, policy = block.namespace["model"], block.namespace["policy"]
    table = mpviz.explain_policy(model, policy).set_index("layer")
    norms = [n for n in table.index if re.fullmatch(r"encoder\.layers\.\d+\.norm\d", n)]
    assert len(norms) == 4 and (table.loc[norms, "precision"] == "fp32").all()   # the glob
    assert table.loc["head", "precision"] == "bf16" and table.loc["head", "rule"] == "*"
    # After handle.remove() and the Recorder, the model is as before: fp32 out, no hooks left.
    assert model(torch.randn(2, 8, 32)).dtype == torch.float32
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # The Recorder applied the policy and recorded the switch of head at the step after i == 9.
    run = mpviz.load_run(block.cwd / "runs" / "steer")
    changes = run.policy_changes
    assert changes[changes["layer"] == "head"][["step", "precision"]].values.tolist() == [
        [0, "bf16"], [10, "fp32"]]
    assert run.last_step == 19 and run.meta["status"] == "finished"
    run.close()


def test_readme_diagnosis_example_does_what_its_comments_say(readme):
    """The demo it records overflows in fc3's forward (as the text under it says): diagnose names
    that, and advise keeps fc3 in fp32 for that reason."""
    block = ran(readme, block_index("Diagnosis"))
    d, policy = block.namespace["d"], block.namespace["policy"]
    first = d.findings[0]
    assert first.kind == "forward_overflow" and first.layers == ["fc3"], first
    assert policy.rules["fc3"] == "fp32" and "forward" in policy.reasons["fc3"]
    run = mpviz.load_run(block.cwd / "runs" / "lr5")
    assert run.last_step == 79 and run.steps["skipped"].sum() == 79
    run.close()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "make dashboard" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
