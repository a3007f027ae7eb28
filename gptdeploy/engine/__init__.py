"""The batching engine: many requests share one runtime's decode steps (continuous batching).

    ticket.py  a caller's handle: text pieces as they come, the result, cancel()
    job.py     one request as data: options, its own sampler, stop rules, text state, timings
    layout.py  the KV layout of the batch: right-aligned rows, merging caches when jobs join or leave
    batch.py   the runtime's batch, row by row: one round (rows leave, joiners prefill, a decode step)
    loop.py    Engine: the queue, the one thread that owns the runtime and runs the rounds, lifetime

    with Engine.load("out/sample", limits=EngineLimits(max_batch=8)) as engine:
        ticket = engine.submit("我喜欢", max_new_tokens=40)   # from any thread
        print(ticket.wait().text)
        async for piece in engine.stream("你好", max_new_tokens=40): ...   # in an asyncio loop

numpy only, like the rest of the run path. gptdeploy.Generator runs on it.
"""

import logging

from gptdeploy.engine.loop import Engine, EngineLimits
from gptdeploy.engine.ticket import Ticket

# A library logs only where the application set logging up (the server does: serve/run.py), so a
# fault reaches the CLI as its one `error:` line, not also as a traceback from logging's fallback.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Engine", "EngineLimits", "Ticket"]
