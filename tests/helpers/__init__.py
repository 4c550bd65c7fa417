"""Helpers shared by the test files (and by benchmarks/live_plots.py), so that no test file
imports another one's privates.

- ``helpers.browser``: Debian's Chromium through Playwright, a Voila server, ``Page`` (what a page
  logged and fetched), ``fill``, ``free_port``, the console-noise filter, and the lab's steps
  that more than one browser test takes (``toggle_at_pause``, ``classifier_to_bf16_at_pause``).
- ``helpers.training``: one small recorded demo run (``record_demo``), a demo process
  (``demo_process``, ``start_demo``) and one torch thread (``one_thread``).
- ``helpers.bad_runs``: a runs folder holding every bad store the apps must survive.
- ``helpers.hooks``: what hooks a model and its optimizer carry (``hook_snapshot``, ``hooks_of``).

Importable as ``helpers.*`` the way ``models`` and ``waiting`` are: pytest puts tests/ on
``sys.path`` (tests/ has no ``__init__.py``; rootdir-relative "prepend" imports), and
benchmarks/live_plots.py inserts tests/ itself.
"""
