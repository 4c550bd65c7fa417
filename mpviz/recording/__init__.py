"""Recording: hooks on a training loop turn each step into plain rows for the run store.

``Recorder`` (:mod:`.recorder`) is the public facade; one file per part: the step's state
(:mod:`.step`), module hooks for dtypes and activations (:mod:`.activations`), gradients
(:mod:`.gradients`), the overflow replay (:mod:`.overflow`), statistics rows (:mod:`.rows`),
which steps take statistics (:mod:`.schedule`: by default within a budget of the training time).
"""
from .recorder import Recorder

__all__ = ["Recorder"]
