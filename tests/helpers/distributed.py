"""Launching the distributed test scripts (tests/ddp_script.py, tests/fsdp_script.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def torchrun(script: str | Path, out_dir: Path, timeout: float = 180) -> list[dict]:
    """Run ``script out_dir`` as a 2-rank torchrun job (gloo, one OpenMP thread a rank); each
    rank's report, ``out_dir/rank{r}.json``. A failed job fails the test with its output."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), str(out_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
