"""`gptdeploy bench`: every backend and baseline on the same token ids and threads, in one run.

    plan.py    the plan, its checks, rows and their statistics, the machine facts, JSON
    worker.py  one row, measured in its own process (`python -m gptdeploy.bench.worker`)
    plot.py    the PNG of decode tokens/s and TTFT against prompt length
"""

from gptdeploy.bench.plan import BenchPlan, Row, run_plan

__all__ = ["BenchPlan", "Row", "run_plan"]
