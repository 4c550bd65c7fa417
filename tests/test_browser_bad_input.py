"""The explorer in Chromium (Voila) against a runs folder holding every bad case of issue 9:
one page goes through them with the run picker, each shows its one message, and the good run
picked after it is drawn. The cases are made on disk by tests/helpers/bad_runs.py's
`make_bad_runs` (truncated, corrupt, empty, non-SQLite, foreign, newer, a symlink out of the
folder, a SIGKILLed demo process); a live demo process's run is deleted while the page follows it.
"""

from __future__ import annotations

import shutil

import mpviz
from mpviz.dashboard import queries
from helpers.bad_runs import EXPECTED, UNREADABLE, make_bad_runs
from helpers.browser import Page, voila
from helpers.training import start_demo


def test_explorer_page_survives_every_bad_run(browser, shots, tmp_path):
    root = tmp_path / "runs"
    runs = make_bad_runs(root)
    killed_steps = len(mpviz.load_run(runs["killed"]).steps)
    killed_points = len(range(0, killed_steps, queries.bucket_size(0, killed_steps - 1, 2000)))
    live = start_demo(root / "live")
    try:
        with voila("explorer.ipynb", root) as url:
            p = Page(browser, url, shots)
            page = p.page
            page.wait_for_selector(".mpviz-explorer .mpviz-steps", timeout=180_000)
            info = page.locator(".mpviz-explorer .mpviz-steps")
            picker = page.locator(".mpviz-run-picker select")

            def pick(name: str, says: str) -> None:
                picker.select_option(label=name)
                p.wait(lambda: says in info.inner_text(), what=f"{name}: {says!r}")

            def good_is_drawn() -> None:
                pick("good", "30 steps · finished")
                p.wait(lambda: p.trace_len("loss:0") == 30, what="the good run's 30 steps")

            for name in [*UNREADABLE, "escape"]:
                pick(name, EXPECTED[name])
                assert page.locator(".mpviz-explorer .mpviz-problem").count() == 1
                p.wait(lambda: p.trace_len("loss:0") == 0, what=f"{name}: an empty plot")
                if name == "truncated":
                    p.shoot(".mpviz-explorer", "explorer-bad-run.png")
                good_is_drawn()

            # A SIGKILLed run: its steps are drawn, it says killed, and it is not followed.
            pick("killed", f"{killed_steps} steps · killed / not finished")
            p.wait(lambda: p.trace_len("loss:0") == killed_points, what="the killed run's steps")
            page.wait_for_timeout(1500)
            assert "following" not in info.inner_text()
            good_is_drawn()

            # A live run deleted while the page follows it.
            pick("live", "following")
            shutil.rmtree(root / "live")
            p.wait(lambda: "was deleted while open" in info.inner_text(), what="the deletion message")
            p.wait(lambda: p.trace_len("loss:0") == 0, what="the deleted run's plot emptied")
            assert live.poll() is None     # the training process goes on, unharmed
            good_is_drawn()

            p.no_python_errors_shown()
            assert not p.our_errors(), p.our_errors()
            p.offline_ok()
            page.close()
    finally:
        live.kill()
        live.wait(30)
