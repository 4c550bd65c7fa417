"""Command line: record a demo run, or summarise a recorded one.

    python -m mpviz demo --task digits --precision fp16 --steps 200 --run-dir runs/demo
    python -m mpviz demo --task text --precision bf16 --policy 'head=fp32,blocks.*.ln*=fp32'
    python -m mpviz info runs/demo
    python -m mpviz report runs/demo -o demo.html
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from mpviz import __version__, serve
from mpviz.formats import PRECISIONS, canonical, did_you_mean
from mpviz.integrations.export import FORMATS as EXPORT_FORMATS

TASK_NAMES = ("digits", "text", "mlp")  # mpviz.tasks.TASKS without importing torch for --help


def _choice(kind: str, valid: Sequence[str]):
    """An argparse ``type=`` that rejects unknown names with the valid ones and close matches."""

    def check(value: str) -> str:
        if value in valid:
            return value
        close = did_you_mean(value, valid, n=2, ask=True)
        hint = f"; {close}" if close else ""
        raise argparse.ArgumentTypeError(f"unknown {kind} {value!r}: choose from {', '.join(valid)}{hint}")

    check.__name__ = kind  # argparse names the type in some messages
    return check


def _precision(value: str) -> str:
    try:
        return canonical(value)  # accepts aliases (float16, mixed_bfloat16, ...)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_policy(text: str) -> dict[str, str]:
    """``'head=fp32,conv*=bf16'`` -> ``{"head": "fp32", "conv*": "bf16"}`` (order kept).

        >>> parse_policy("head=fp32, conv*=bf16")
        {'head': 'fp32', 'conv*': 'bf16'}
    """
    rules: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        pattern, sep, prec = part.partition("=")
        if not sep or not pattern.strip() or not prec.strip():
            raise argparse.ArgumentTypeError(
                f"bad policy rule {part!r}: write LAYER_PATTERN=PRECISION, e.g. 'head=fp32,conv*=bf16'")
        rules[pattern.strip()] = _precision(prec.strip())
    return rules


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpviz", description="Record and inspect mixed-precision training.")
    p.add_argument("--version", action="version", version=f"mpviz {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve.add_parsers(sub)   # lab, explore, compare, tour: serve an app with Voila
    _add_demo_parser(sub)

    i = sub.add_parser("info", help="summarise a recorded run")
    i.add_argument("run_dir", help="a run directory (holds run.db)")

    x = sub.add_parser("export", help="write a run as TensorBoard event files, CSV or Parquet")
    x.add_argument("format", type=_choice("export format", EXPORT_FORMATS),
                   help=f"one of {', '.join(EXPORT_FORMATS)}")
    x.add_argument("run_dir", help="a run directory (holds run.db)")
    x.add_argument("out_dir", help="where to write (created if missing)")

    g = sub.add_parser("diagnose", help="say what went wrong in a run, where, and what to change")
    g.add_argument("run_dir", help="a run directory (holds run.db)")
    g.add_argument("--apply", action="store_true",
                   help="send mpviz.advise's layers to the job recording RUN_DIR (a live run "
                        "recorded with Recorder(..., steerable=True)) as one mpviz.steer request")

    r = sub.add_parser("report", help="write a run as one self-contained HTML file (plots, diagnosis, metadata)",
                       description="Write one HTML file that opens offline in any browser: the loss, "
                                   "loss scale, samples/s, dtype map, gradient heatmap, diagnosis and "
                                   "metadata of a run, for a pull request, an issue or a chat.")
    r.add_argument("run_dir", help="a run directory (holds run.db)")
    r.add_argument("-o", "--output", default=None, help="the HTML file to write (default <run name>.html)")
    return p


def _add_demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="train and record one demo task",
                       description="Train a demo task for a few steps and record it with mpviz.Recorder.")
    d.add_argument("--task", type=_choice("task", TASK_NAMES), default="digits",
                   help=f"one of {', '.join(TASK_NAMES)} (default digits)")
    d.add_argument("--precision", type=_precision, default="fp32",
                   help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    d.add_argument("--steps", type=_positive, default=200, help="training steps (default 200)")
    d.add_argument("--run-dir", default=None, help="where to write the run (default runs/<task>-<precision>-<time>)")
    d.add_argument("--every", type=_positive, default=None,
                   help="per-layer statistics exactly every N steps (default: at most every 10, "
                        "fewer when they would cost more than 3%% of the training time)")
    d.add_argument("--batch-size", type=_positive, default=None, help="default: the task's own")
    d.add_argument("--lr", type=_positive_float, default=None, help="Adam learning rate (default: the task's own)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--policy", type=parse_policy, default=None,
                   help="per-layer precision rules, e.g. 'head=fp32,conv*=bf16'")
    d.add_argument("--threads", type=_positive, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_demo(args: argparse.Namespace) -> int:
    _check_new_run_dir(args.run_dir)
    t0 = time.perf_counter()
    run_dir, metric = _train_demo(args)
    wall = time.perf_counter() - t0

    import mpviz

    run = mpviz.load_run(run_dir)
    steps = run.steps
    tail = steps["loss"].tail(10)
    sps = steps["samples"].sum() / steps["step_time_s"].sum()
    print(f"run written to {run_dir}  (open it: python -m mpviz info {run_dir})")
    print(f"final loss {tail.mean():.4f} (mean of last {len(tail)}), first {steps['loss'].iloc[0]:.4f}; "
          + ", ".join(f"held-out {k} {v:.4f}" for k, v in metric.items()))
    print(f"{len(steps)} steps, {_skipped(steps, run.meta.get('scaler'))}, {sps:.0f} samples/s, "
          f"{wall:.1f} s wall")
    run.close()
    return 0


def _check_new_run_dir(run_dir: str | None) -> None:
    if run_dir is None:
        return
    where = Path(run_dir)
    if where.exists() and not where.is_dir():
        fail(f"--run-dir {run_dir!r} is a file, not a directory: choose a new run directory")
    if (where / "run.db").exists():
        fail(f"{run_dir!r} already holds a run: choose a new --run-dir (or delete the old one)")


def _train_demo(args: argparse.Namespace) -> tuple[Path, dict[str, float]]:
    """Train and record the demo: its run directory and held-out metrics."""
    from tqdm import tqdm

    import torch

    from mpviz.demos import Trainer
    from mpviz.store import RunStoreError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trainer = Trainer(task=args.task, precision=args.precision, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, run_dir=args.run_dir, every=args.every,
                          policy=args.policy)
    except (ValueError, RunStoreError, OSError) as e:  # bad --policy layer names, --lr, run dir
        fail(str(e))
    with trainer:
        bar = tqdm(range(args.steps), desc=f"{args.task} {trainer.precision}", unit="step",
                   disable=args.quiet, dynamic_ncols=True)
        for _ in bar:
            out = trainer.step()
            bar.set_postfix(loss=f"{out['loss']:.4f}", refresh=False)
        metric = trainer.evaluate()
    return trainer.recorder.run_dir, metric


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _has_scaler(s: object) -> bool:
    return isinstance(s, dict) and bool(s.get("enabled", True))


def _skipped(steps: Any, scaler: object) -> str:
    """How many steps GradScaler skipped, or that there was none to skip any."""
    if not _has_scaler(scaler):
        return "no GradScaler"
    return f"{int(steps['skipped'].sum())} skipped by GradScaler"


def _fmt_scaler(s: object) -> str:
    if not _has_scaler(s):
        return "no GradScaler"
    return (f"GradScaler(growth x{_fmt(s.get('growth_factor'))} every {s.get('growth_interval')} steps, "
            f"backoff x{_fmt(s.get('backoff_factor'))})")


def cmd_info(args: argparse.Namespace) -> int:
    import mpviz

    if not (Path(args.run_dir) / "run.db").exists() and not Path(args.run_dir).is_file():
        fail(f"no run at {args.run_dir!r} (expected {args.run_dir}/run.db); runs found under "
             f"runs/: {', '.join(map(str, mpviz.list_runs('runs')[:5])) or 'none'}")
    try:
        run = mpviz.load_run(args.run_dir)
    except mpviz.RunStoreError as e:
        fail(str(e))
    try:
        meta = run.meta
        steps, overflows, ranks = _first_rank(run.steps, run.overflows)
        _print_run(run, meta, ranks)
        _print_steps(steps, meta)
        _print_overflows(overflows, ranks)
        print("  " + _policy_summary(run.policy_changes))
    finally:
        run.close()
    return 0


def _first_rank(steps: Any, overflows: Any) -> tuple[Any, Any, list[int]]:
    """A distributed job: the steps of rank 0, and the overflows where each rank's inf/nan was born."""
    ranks = sorted(steps["rank"].unique().tolist()) if "rank" in steps and len(steps) else [0]
    if len(ranks) > 1:
        steps = steps[steps["rank"] == ranks[0]]
        if "origin" in overflows and len(overflows):
            overflows = overflows[overflows["origin"].fillna(True).astype(bool)]
    return steps, overflows, ranks


def _print_run(run: Any, meta: dict, ranks: list[int]) -> None:
    from mpviz.mailbox import run_status   # "killed / not finished" when its writer is gone

    layers = run.layers
    start, end = meta.get("start_time"), meta.get("end_time")
    dur = f", {end - start:.1f} s" if isinstance(start, (int, float)) and isinstance(end, (int, float)) else ""
    print(f"run {run.run_dir}: {run_status(meta)}{dur}")
    print(f"  model {meta.get('model')} on {meta.get('device')}, torch {meta.get('torch_version')}, "
          f"{len(layers)} modules, {int(layers['n_params'].sum())} parameters")
    extras = {k: meta[k] for k in ("task", "precision", "batch_size", "lr", "seed") if k in meta}
    if extras:
        print("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in extras.items()))
    print(f"  autocast {_fmt(meta.get('autocast_dtype'))}, {_fmt_scaler(meta.get('scaler'))}, "
          f"statistics {run.stats_schedule}")
    if len(ranks) > 1:
        print(f"  {len(ranks)} ranks; steps below are rank {ranks[0]}'s, overflow events the ones "
              f"born on a rank (origin)")


def _print_steps(steps: Any, meta: dict) -> None:
    if not len(steps):
        print("  no steps recorded yet")
        return
    steps = steps.assign(loss=steps["loss"].astype(float))   # None (no loss given) -> NaN
    tail = steps["loss"].tail(10)
    sps = steps["samples"].sum() / steps["step_time_s"].sum() if steps["samples"].notna().any() else float("nan")
    print(f"  {len(steps)} steps; loss {_fmt(float(steps['loss'].iloc[0]))} -> {_fmt(float(tail.mean()))} "
          f"(mean of last {len(tail)}); {_skipped(steps, meta.get('scaler'))}; {_fmt(float(sps))} samples/s")
    used, after = steps["loss_scale"].dropna(), steps["loss_scale_after"].dropna()
    if len(used):
        # the scale the first step used -> the one in force after the last update()
        last = after.iloc[-1] if len(after) else used.iloc[-1]
        low = min(used.min(), after.min()) if len(after) else used.min()
        print(f"  loss scale {used.iloc[0]:.6g} -> {last:.6g} (min {low:.6g})")


def _print_overflows(overflows: Any, ranks: list[int]) -> None:
    firsts = overflows[overflows["first"]] if len(overflows) else overflows
    where = (f" of rank {int(firsts['rank'].iloc[0])}" if len(ranks) > 1 and len(firsts) and "rank" in firsts
             else "")
    print(f"  {len(overflows)} overflow events on {overflows['step'].nunique() if len(overflows) else 0} steps"
          + (f"; first culprit {firsts['layer'].iloc[0]!r}{where} at step {int(firsts['step'].iloc[0])}"
             if len(firsts) else ""))


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Print :func:`mpviz.diagnose`'s report (exit 0 whatever it finds; 2 for no readable run);
    ``--apply``: send :func:`mpviz.advise` to the live steerable job (2 if it cannot be sent)."""
    import mpviz

    if not (Path(args.run_dir) / "run.db").exists() and not Path(args.run_dir).is_file():
        fail(f"no run at {args.run_dir!r} (expected {args.run_dir}/run.db)")
    try:
        diagnosis = mpviz.diagnose(args.run_dir)
    except mpviz.RunStoreError as e:
        fail(str(e))
    print(diagnosis)
    if args.apply:
        from mpviz.diagnosis.advise import advice_target

        run = mpviz.load_run(args.run_dir)
        try:
            policy = mpviz.advise(run, target=advice_target(run), diagnosis=diagnosis)
        finally:
            run.close()
        try:
            rid = mpviz.steer(args.run_dir, policy)
        except mpviz.SteerError as e:
            fail(str(e))
        rules = mpviz.steer_status(args.run_dir, rid)["rules"]
        print(f"\nadvice sent to the job as steering request #{rid} (applied from its next step):")
        for layer, precision in rules.items():
            print(f"  {layer} -> {precision}: {policy.reasons.get(layer, '')}")
        print(f"follow it: mpviz.steer_status({str(args.run_dir)!r}, {rid})")
    return 0


def _policy_summary(changes: Any) -> str:
    """The policy the run started with (its rows at step 0, recorded when training starts) and
    the per-layer changes made later."""
    initial, later = changes[changes["step"] == 0], changes[changes["step"] > 0]
    groups = initial.groupby(["rule", "precision"], sort=False, dropna=False)["layer"].size()
    start = ", ".join(f"{rule}={prec}" + (f" ({n} layers)" if n > 1 else "")
                      for (rule, prec), n in groups.items())
    text = f"initial policy: {start or 'none (every layer as autocast runs it)'}; "
    if not len(later):
        return text + "no precision changes during training"
    return (text + f"{len(later)} per-layer precision changes on {later['step'].nunique()} steps, "
            f"last at step {int(later['step'].max())}")


def cmd_export(args: argparse.Namespace) -> int:
    from mpviz.integrations.export import export
    from mpviz.store import RunStoreError

    try:
        files = export(args.run_dir, args.format, args.out_dir)
    except (RunStoreError, ImportError, OSError) as e:
        fail(str(e))
    print(f"wrote {len(files)} file(s) to {args.out_dir}"
          + (f" (tensorboard --logdir {args.out_dir})" if args.format == "tensorboard" else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write :func:`mpviz.report.write_report` of RUN_DIR to ``-o`` (exit 2 for no readable run)."""
    if not (Path(args.run_dir) / "run.db").exists() and not Path(args.run_dir).is_file():
        fail(f"no run at {args.run_dir!r} (expected {args.run_dir}/run.db)")
    out = Path(args.output or f"{Path(args.run_dir).resolve().name}.html")
    if out.is_dir():
        fail(f"-o {str(out)!r} is a directory: give a file name, e.g. {out / 'report.html'}")
    from mpviz.report import write_report
    from mpviz.store import RunStoreError

    try:
        write_report(args.run_dir, out)
    except (RunStoreError, OSError) as e:
        fail(str(e))
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MB): open it in any browser, no server "
          "or network needed")
    return 0


class UserError(Exception):
    """Something the user can fix: :func:`main` prints it as one line and returns 2."""


def fail(message: str) -> NoReturn:
    raise UserError(" ".join(message.split()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mpviz`` and the ``mpviz`` script.

        >>> main(["info", "runs/does-not-exist"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)  # bad arguments: argparse's usage + error, exit 2
    try:
        if args.command in serve.APPS:
            try:
                return serve.command(args)
            except serve.Refused as e:
                fail(str(e))
        if args.command == "diagnose":
            return cmd_diagnose(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_demo(args) if args.command == "demo" else cmd_info(args)
    except UserError as e:  # one line ``mpviz: error: ...``, exit status 2 (as argparse's)
        print(f"mpviz: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
