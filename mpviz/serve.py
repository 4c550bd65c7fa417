"""One command per app: ``mpviz lab | explore | compare | tour`` serve it with Voila.

    mpviz lab                                  # the precision lab (demo tasks)
    mpviz lab --model mypkg.train:lab_parts    # your model (see `load_parts`)
    mpviz explore runs/                        # the run explorer over a folder of runs, or one run
    mpviz compare runs/a runs/b
    mpviz tour                                 # the guided tour

Each serves its notebook (``mpviz/apps/*.ipynb``) on 127.0.0.1, culls idle kernels, and on
Ctrl-C or SIGTERM shuts them down. The notebook learns what to show from the environment its
kernel inherits (:data:`ENV`, read by `from_env`): the runs folder, the run to open, the runs
to compare, your model's ``module:function``, the folder the command was typed in.
No torch here: the kernels import it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

APPS = {"lab": "lab.ipynb", "explore": "explorer.ipynb", "compare": "compare.ipynb",
        "tour": "tour.ipynb"}
APPS_DIR = Path(__file__).resolve().with_name("apps")
DEFAULT_PORT = 8866   # Voila's own; another free port when it is taken
# As `make dashboard`: a kernel with no page for 10 minutes is shut down (checked every minute).
CULL = ["--MappingKernelManager.cull_idle_timeout=600", "--MappingKernelManager.cull_interval=60",
        "--MappingKernelManager.cull_connected=True"]
ENV = ("MPVIZ_RUNS_DIR", "MPVIZ_RUN", "MPVIZ_COMPARE", "MPVIZ_LAB_MODEL", "MPVIZ_CWD")


class Refused(Exception):
    """Arguments the user can fix (the CLI prints ``mpviz: error: ...``, exit status 2)."""


def add_parsers(sub: Any) -> None:
    """The four app commands, on the CLI's subparsers."""
    RUNS = os.environ.get("MPVIZ_RUNS_DIR") or "runs"   # the default runs folder, as the apps'

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--port", type=int, default=None,
                       help=f"port on 127.0.0.1 (default {DEFAULT_PORT}, or a free one if taken)")
        p.add_argument("--no-browser", action="store_true", help="print the URL, open no browser")
        return p

    lab = common(sub.add_parser("lab", help="serve the precision lab (train live, toggle precisions)"))
    lab.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                     help="your model: a function, importable from here, returning a dict with "
                          "model, optimizer, data and loss_fn(model, batch) or train_step(model, batch) "
                          "(optional: scaler, eval_fn, eval_data, name), e.g. mypkg.train:lab_parts")
    lab.add_argument("--runs-dir", default=RUNS, help="where the lab records its runs (default "
                                                      "$MPVIZ_RUNS_DIR, else runs)")
    ex = common(sub.add_parser("explore", help="serve the run explorer over a folder of runs, or one run"))
    ex.add_argument("path", nargs="?", default=RUNS,
                    help="a folder of runs or one run (default $MPVIZ_RUNS_DIR, else runs)")
    cmp = common(sub.add_parser("compare", help="serve the comparison of two or more runs"))
    cmp.add_argument("paths", nargs="*", default=[RUNS],
                     help="runs to compare, or one folder of runs (its newest two; default "
                          "$MPVIZ_RUNS_DIR, else runs)")
    tour = common(sub.add_parser("tour", help="serve the guided tour of mixed precision"))
    tour.add_argument("--runs-dir", default=RUNS, help="where the tour records its runs (default "
                                                        "$MPVIZ_RUNS_DIR, else runs)")


def command(args: argparse.Namespace) -> int:
    """Run ``mpviz lab | explore | compare | tour`` (`Refused` for bad arguments)."""
    env = {"lab": _lab_env, "explore": _explore_env, "compare": _compare_env,
           "tour": lambda a: {"MPVIZ_RUNS_DIR": str(Path(a.runs_dir).resolve())}}[args.command](args)
    return serve(args.command, env, port=args.port, open_browser=not args.no_browser)


def _is_run(path: Path) -> bool:
    return (path / "run.db").exists() or any(path.glob("run-rank*.db"))


def _existing(path: str) -> Path:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise Refused(f"no such folder: {path!r}")
    return p.parent if p.is_file() else p   # runs/exp1/run.db: the run


def _lab_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"MPVIZ_RUNS_DIR": str(Path(args.runs_dir).resolve())}
    if args.model:
        module, _, name = args.model.partition(":")
        if not module or not name.isidentifier():
            raise Refused(f"--model {args.model!r}: write MODULE:FUNCTION, e.g. mypkg.train:lab_parts")
        sys.path.insert(0, os.getcwd())   # as the kernel will find it (MPVIZ_CWD)
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            found, why = None, f" ({e})"
        else:
            why = ""
        finally:
            sys.path.pop(0)
        if found is None:
            raise Refused(f"--model {args.model!r}: no module {module!r} importable from "
                          f"{os.getcwd()}{why}")
        env["MPVIZ_LAB_MODEL"] = args.model
    return env


def _explore_env(args: argparse.Namespace) -> dict[str, str]:
    p = _existing(args.path)
    if _is_run(p):   # one run: its folder is the runs folder, the run is opened
        return {"MPVIZ_RUNS_DIR": str(p.parent), "MPVIZ_RUN": str(p)}
    return {"MPVIZ_RUNS_DIR": str(p)}


def _compare_env(args: argparse.Namespace) -> dict[str, str]:
    paths = [_existing(p) for p in args.paths]
    if len(paths) == 1 and not _is_run(paths[0]):   # a folder: its newest two
        return {"MPVIZ_RUNS_DIR": str(paths[0])}
    not_runs = [str(p) for p in paths if not _is_run(p)]
    if not_runs:
        raise Refused(f"not runs (no run.db): {', '.join(not_runs)}; give runs, or one folder of runs")
    return {"MPVIZ_RUNS_DIR": os.path.commonpath([p.parent for p in paths]),
            "MPVIZ_COMPARE": os.pathsep.join(map(str, paths))}


def _port(port: int | None) -> int:
    """`port` if free (`Refused` if taken); without one, 8866 or any free port."""
    for p in ([port] if port is not None else [DEFAULT_PORT, 0]):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return s.getsockname()[1]
            except OSError:
                continue
    raise Refused(f"port {port} is in use: choose another --port, or leave it out for a free one")


def serve(app: str, env: Mapping[str, str], port: int | None = None, open_browser: bool = True) -> int:
    """Serve ``apps/<app>`` with Voila on 127.0.0.1 until Ctrl-C or SIGTERM, then shut its kernels
    down. `env`: what the notebook reads (`from_env`)."""
    from voila.app import Voila

    port = _port(port)
    for key in ENV:   # only this command's say
        os.environ.pop(key, None)
    os.environ.update(env, MPVIZ_CWD=os.getcwd())   # Voila's kernels inherit it
    argv = [str(APPS_DIR / APPS[app]), f"--port={port}", "--Voila.ip=127.0.0.1",
            "--Voila.port_retries=0", "--VoilaConfiguration.show_tracebacks=True", "--Voila.log_level=ERROR",
            *CULL] + ([] if open_browser else ["--no-browser"])
    print(f"mpviz {app}: http://127.0.0.1:{port}/  (Ctrl-C to stop)", flush=True)

    def interrupted(signum: int, frame: Any) -> None:
        # Voila shuts its kernels down on KeyboardInterrupt; a second Ctrl-C must not cut that short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"mpviz {app}: stopping the server and its kernels", flush=True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)   # SIGTERM: Voila's own handler, the same shutdown
    Voila.launch_instance(argv=argv)
    return 0


def from_env(app: str) -> dict[str, Any]:
    """The keywords ``mpviz <app>`` gives the app's notebook (`app`: lab, explorer, compare):
    ``{}`` when it was served otherwise (Binder, ``make dashboard``, JupyterLab)."""
    env = os.environ
    if env.get("MPVIZ_CWD"):   # the user's folder: their modules and relative paths
        os.chdir(env["MPVIZ_CWD"])
        sys.path.insert(0, env["MPVIZ_CWD"])
    if app == "explorer" and env.get("MPVIZ_RUN"):
        return {"run_dir": env["MPVIZ_RUN"]}
    if app == "compare" and env.get("MPVIZ_COMPARE"):
        return {"runs": env["MPVIZ_COMPARE"].split(os.pathsep)}
    if app == "lab" and env.get("MPVIZ_LAB_MODEL"):
        return load_parts(env["MPVIZ_LAB_MODEL"])
    return {}


def load_parts(spec: str) -> dict[str, Any]:
    """``lab_app``'s keywords from your ``module:function()``: a dict with ``model``,
    ``optimizer``, ``data`` and ``loss_fn(model, batch)`` or ``train_step(model, batch)``, and
    optionally any other `Lab` keyword (``scaler``, ``eval_fn``, ...); a ``meta`` is left out.

        >>> load_parts("mypkg.train:lab_parts")   # doctest: +SKIP
    """
    module, _, name = spec.partition(":")
    parts = getattr(importlib.import_module(module), name)()
    if not isinstance(parts, Mapping):
        raise TypeError(f"{spec}() returned {type(parts).__name__}: return a dict with model, "
                        f"optimizer, data and loss_fn (or train_step)")
    return {k: v for k, v in parts.items() if k != "meta"}
