"""How long each teaching scenario takes, in the lab, from Start to the Diagnosis panel naming it.

For each scenario of `mpviz.scenarios`: ``lab_app(scenario=NAME)`` (headless, as in the tests),
``start()``, then poll the lab's Diagnosis panel (what the page shows) every 50 ms until a finding
of the scenario's kind at warning/error appears; report the seconds and the steps trained by
then, the whole session (``max_steps``) is trained either way; then the same for the fixed run
(is its diagnosis clean?).
The panel re-diagnoses at most every 2 s (and at most 10% of the time), so its cadence is part of
the time a learner waits. Torch runs with its default number of threads (what a Voila kernel
uses) unless ``--threads`` says otherwise. Not a test: a busy machine makes these numbers larger.

    python benchmarks/scenarios_lab.py                 # all four, ~1 min here
    python benchmarks/scenarios_lab.py --threads 1 fp16-overflow
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def time_to_diagnosis(name: str, runs_dir: str, timeout_s: float = 120.0) -> dict:
    from mpviz.dashboard import lab_app
    from mpviz.scenarios import get_scenario

    sc = get_scenario(name)
    t0 = time.perf_counter()
    lab = lab_app(runs_dir=runs_dir, scenario=name)
    built = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        lab.start()
        seen, steps = None, None
        while time.perf_counter() - t0 < timeout_s:
            d = lab.diagnosis.diagnosis
            hits = [f for f in d.findings if f.kind == sc.expect
                    and f.severity in ("warning", "error")] if d is not None else []
            if hits and seen is None and not name.endswith("-fixed"):
                seen, steps = time.perf_counter() - t0, lab.worker.rounds
            if lab.worker is not None and not lab.worker.alive and d is not None:
                break   # the session ended and its final diagnosis is in
            time.sleep(0.05)
        session = time.perf_counter() - t0
        lab.stop()
        d = lab.diagnosis.diagnosis
        return {"scenario": name, "build_s": built, "to_diagnosis_s": seen, "steps": steps,
                "session_steps": lab.worker.rounds, "session_s": session,
                "findings": [f"{f.severity}:{f.kind}" for f in d.findings] if d else None}
    finally:
        lab.close()


def main() -> None:
    from mpviz.scenarios import SCENARIOS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=list(SCENARIOS))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as runs:
        for name in args.names:
            for n in (name, f"{name}-fixed"):
                r = time_to_diagnosis(n, runs)
                when = (f"{r['to_diagnosis_s']:.1f} s (step {r['steps']})"
                        if r["to_diagnosis_s"] is not None else "-")
                print(f"{n:24s} lab built {r['build_s']:.1f} s · named after {when} · "
                      f"session {r['session_steps']} steps in {r['session_s']:.1f} s · "
                      f"findings {r['findings']}", flush=True)


if __name__ == "__main__":
    main()
