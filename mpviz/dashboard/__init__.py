"""The Voila/Jupyter apps: the precision lab, the run explorer and the run comparison.

Each app is an object whose `.widget` is an ipywidgets box; the notebooks in `notebooks/` only
call these functions (the last line of a cell displays the app):

>>> from mpviz.dashboard import lab_app, explorer_app, compare_app
>>> lab_app(runs_dir="../runs")              # doctest: +SKIP
>>> lab_app(model=model, optimizer=opt, data=loader,              # your model  # doctest: +SKIP
...         loss_fn=lambda model, batch: model(**batch).loss)
>>> explorer_app(runs_dir="../runs")         # doctest: +SKIP
>>> compare_app(runs_dir="../runs")          # doctest: +SKIP

Nothing here imports torch: the lab's worker imports `mpviz.demos` (the `Trainer` that steps a
demo task or your model) lazily, on its torch thread.
"""

from .compare import Compare, compare_app
from .explorer import Explorer, explorer_app
from .lab import Lab, lab_app

__all__ = ["Lab", "lab_app", "Explorer", "explorer_app", "Compare", "compare_app"]
