"""Several ranks under torch.distributed (gloo, CPU): each rank writes its own store in one run_dir."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mpviz


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                              nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    with mpviz.Recorder(model, optimizer=opt, run_dir=run_dir, every=2) as rec:
        for _ in range(6):
            x = torch.randn(32, 8, generator=g)
            loss = nn.functional.mse_loss(model(x), x[:, :1] * 2)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss, samples=32)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_each_rank_records_its_own_store(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "run")), nprocs=2, join=True)
    r0 = mpviz.load_run(tmp_path / "run")
    r1 = mpviz.load_run(tmp_path / "run", rank=1)
    assert r0.meta["rank"] == 0 and r1.meta["rank"] == 1 and r1.meta["world_size"] == 2
    assert r0.last_step == r1.last_step == 5
    # different data per rank, so different losses; DDP averages gradients, so equal grad norms
    assert r0.steps["loss"].tolist() != r1.steps["loss"].tolist()
    g0 = r0.layer_stats.query("tensor == 'grad'")["norm"].to_numpy()
    g1 = r1.layer_stats.query("tensor == 'grad'")["norm"].to_numpy()
    assert len(g0) and g0 == pytest.approx(g1, rel=1e-5)
