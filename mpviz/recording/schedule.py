"""Which steps take per-layer statistics, and which steps are watched.

``every=N``: exactly the multiples of ``N``. The default: at most every ``DEFAULT_EVERY`` steps,
on its multiples, while what statistics cost so far stays within ``stats_budget`` (3%) of the
training time without them; a statistics step that is expensive relative to the step (a tiny
model on the CPU) is taken less often. (In a distributed job, exactly every 10: each rank
measures its own costs, and ranks would take statistics on different steps.)

The cost is measured, not guessed: on the training thread, a statistics step's CPU time from its
first forward to ``rec.step()`` (the thread's own clock: no data loading, no other process) less
the median of recent plain steps'; on the writer thread, its whole CPU time, with the steps it
has not finished yet charged its average (before its first commit, twice the training thread's
cost). A running balance against the steps so far times the median plain step, so the share
converges to the budget. The first step (warm-up) and replayed steps are not measured.
``run.meta["stats_cost"]`` keeps what was measured.
"""
from __future__ import annotations

from collections import deque
from statistics import median
from typing import Any

DEFAULT_EVERY = 10
DEFAULT_BUDGET = 0.03


class StatsSchedule:
    """``writer``: the run's :class:`mpviz.store.RunWriter` (its ``busy_s`` and ``later_done``),
    set once the store is open."""

    def __init__(self, every: int, budget: float | None = None, writer: Any = None) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1 (statistics every N steps), got {every}")
        if budget is not None and not 0.0 < float(budget) < 1.0:
            raise ValueError(f"stats_budget must be a share of training time between 0 and 1 "
                             f"(e.g. 0.05 for 5%), got {budget}")
        self.every = int(every)
        self.budget = None if budget is None else float(budget)
        self.writer = writer
        self.steps = 0   # steps ended
        self.taken = 0   # statistics steps ended
        self.plain: deque[float] = deque(maxlen=64)  # recent durations (s) of plain steps,
        self.plain_cpu: deque[float] = deque(maxlen=64)  # and their CPU time on this thread
        self.train_s = 0.0  # what the statistics steps measured so far cost on this thread
        self.measured = 0   # how many were measured

    def step_ended(self, seconds: float, cpu_seconds: float, stats_step: bool,
                   usual: bool = True) -> None:
        """A step took ``seconds`` (from the end of the previous one, the loop included), of
        ``cpu_seconds`` of the training thread's CPU time from its first forward on.
        ``usual=False``: a step that did more than train (the forward replayed to find an
        inf/nan) or whose forward was not seen: not measured."""
        self.steps += 1
        self.taken += stats_step
        if self.budget is None or self.steps == 1 or not usual:  # the first step: warm-up
            return
        if not stats_step:
            self.plain.append(seconds)
            self.plain_cpu.append(cpu_seconds)
        elif self.plain_cpu:
            self.train_s += max(0.0, cpu_seconds - median(self.plain_cpu))
            self.measured += 1

    def is_stats_step(self, index: int) -> bool:
        """Whether step ``index`` takes statistics (asked once, when the step begins)."""
        if index % self.every:
            return False
        if self.budget is None or not self.plain:
            return True
        plain_s, train_s, writer_s = self._measured()
        return train_s + writer_s <= self.budget * plain_s

    def _measured(self) -> tuple[float, float, float]:
        """Seconds so far: of plain training (steps x a plain step), of statistics on the
        training thread, and on the writer thread."""
        typical = median(self.plain) if self.plain else 0.0
        extra = self.train_s / self.measured if self.measured else 0.0
        train_s = self.train_s + (self.taken - self.measured) * extra  # (unmeasured: average)
        w = self.writer
        writer_s = 0.0
        if w is not None:
            busy, done = w.busy_s, w.later_done
            each = busy / done if done else 2 * extra
            writer_s = busy + max(0, self.taken - done) * each
        return self.steps * typical, train_s, writer_s

    def summary(self) -> dict[str, Any]:
        """What the schedule measured (stored as ``run.meta["stats_cost"]`` at the end)."""
        plain_s, train_s, writer_s = self._measured()
        return {"stats_steps": self.taken, "budget": self.budget,
                "share": (train_s + writer_s) / plain_s if plain_s else None,
                "train_s": round(train_s, 6), "writer_s": round(writer_s, 6),
                "plain_s": round(plain_s, 6),
                "plain_step_s": round(plain_s / self.steps, 7) if self.steps else None}


class StepPlan:
    """The one place that decides where a step's statistics and dtypes come from: whether it
    takes statistics (this rank, the schedule), whether its module hooks are on ("watched":
    statistics steps, the first step, after a policy change, and a forward whose autocast state
    or input dtype changed), and whether a compiled forward is rerun eagerly for them.

    ``sharded`` (FSDP2): the statistics of gradients and weights are collectives, so every rank
    joins them on the schedule's steps ("joins"), also a rank that stores no statistics; the
    schedule must then be a fixed ``every`` (no measured budget, which each rank would decide on
    its own), and no forward is rerun (it would all-gather on this rank alone)."""

    def __init__(self, schedule: StatsSchedule, stats_rank: bool, sharded: bool = False,
                 world_size: int = 1) -> None:
        if sharded and world_size > 1 and schedule.budget is not None:
            raise ValueError(
                "stats_budget= lets each rank pick its statistics steps from its own measured "
                "costs, but under FSDP the statistics of gradients and weights are collectives "
                "that every rank must join on the same steps: pass every=N instead (and "
                "stats_budget=None)")
        self.schedule, self.stats_rank, self.sharded = schedule, stats_rank, sharded
        self.watch_next = True
        self.key: Any = None  # (autocast state, input dtype) of the last watched forward

    def begin(self, index: int) -> tuple[bool, bool, bool]:
        """(statistics step, watched, joins the statistics collectives) of the step that
        begins."""
        scheduled = self.schedule.is_stats_step(index)
        stats = self.stats_rank and scheduled
        watching, self.watch_next = stats or self.watch_next, False
        return stats, watching, self.sharded and scheduled

    def forward(self, watching: bool, autocast: Any, input_dtype: Any) -> bool:
        """Whether the step is watched from this training forward on."""
        key = (autocast, input_dtype)
        if self.watch_next or key != self.key:
            watching = True
        if watching:
            self.key, self.watch_next = key, False
        return watching

    def policy_changed(self) -> None:
        self.watch_next = True

    def rerun(self, s: Any) -> bool:
        """Module hooks do not run in compiled code: a watched step reruns its forward eagerly
        (not under FSDP)."""
        return (s.compiled and s.watching and s.inputs is not None and not s.rerun
                and not self.sharded)
