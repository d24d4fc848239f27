"""`smoe serve` under torchrun: rank 0 serves HTTP and schedules; every rank steps the engine.

A split model (smoe/parallel.py) runs collectives inside every forward pass, so all ranks must
run the same forward passes in the same order. Rank 0's scheduler talks to a `LockstepEngine`:
each call that runs the model (admit, prefill, step, remove, a routing trace) is first broadcast
to the other ranks, which replay it on engines of their own (`follow`). The calls carry only
Python values (token ids, sampling parameters with their seed, row numbers), so every rank's
engine holds the same sequences and samples the same tokens. While the server is idle the
scheduler sends a heartbeat every few seconds, so that the followers' wait never reaches the
process group's timeout — which stays short enough to notice a rank that died.
"""

from __future__ import annotations

import torch.distributed as dist

from smoe.errors import GenerationError
from smoe.generate import Engine
from smoe.server.app import trace_experts

HEARTBEAT_S = 5.0


def _broadcast(message) -> object:
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LockstepEngine:
    """Rank 0's engine: the same interface as Engine; model-running calls go to every rank."""

    heartbeat_s = HEARTBEAT_S

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):  # rows, active, prefilling, check, max_seq_len, cache, model, ...
        return getattr(self.engine, name)

    def admit(self, prompt_ids: list[int], params):
        _broadcast(("admit", list(prompt_ids), params))
        return self.engine.admit(prompt_ids, params)

    def prefill(self, seq) -> str:
        _broadcast(("prefill", seq.row))
        return self.engine.prefill(seq)

    def step(self):
        _broadcast(("step",))
        return self.engine.step()

    def remove(self, seq) -> None:
        _broadcast(("remove", seq.row))
        self.engine.remove(seq)

    def trace(self, token_ids: list[int]):

        _broadcast(("trace", list(token_ids)))
        return trace_experts(self.engine.model, token_ids)

    def heartbeat(self) -> None:
        _broadcast(("noop",))

    def close(self) -> None:
        _broadcast(("stop",))


def follow(engine: Engine) -> None:
    """Ranks > 0: replay rank 0's calls until it stops."""

    while True:
        op, *args = _broadcast(None)
        try:
            if op == "admit":
                engine.admit(*args)
            elif op == "prefill":
                engine.prefill(engine.rows[args[0]])
            elif op == "step":
                engine.step()
            elif op == "remove":
                seq = engine.rows[args[0]]
                if seq is not None:
                    engine.remove(seq)
            elif op == "trace":
                trace_experts(engine.model, args[0])
            elif op == "stop":
                return
        except GenerationError:  # rank 0 met the same error on the same state
            continue
