"""`gptdeploy bench`: every bundle on every backend, and the baselines, on the same token ids and threads.

    plan.py          the plan, its checks, the rows to run, ratios, the machine facts, JSON
    measure.py       a row and how it is timed (stdlib + numpy only: also runs under llama.cpp's python)
    worker.py        one runtime / hf / optimum row, in its own process (`python -m gptdeploy.bench.worker`)
    llama_worker.py  one llama.cpp row, in its own process under --llama-python (run by path)
    llama.py         llama.cpp checks, and llama.cpp's own llama-bench / llama-batched-bench
    plot.py          the PNG: decode tokens/s and TTFT against prompt length, batch and threads
"""

from gptdeploy.bench.plan import BenchPlan, Row, run_plan

__all__ = ["BenchPlan", "Row", "run_plan"]
