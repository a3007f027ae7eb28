"""Audit while serving: every finished request appends its record to the hash-chained log.

Records are built and appended on one thread of their own (encoding a record's attention takes
milliseconds; the event loop and the engine thread never wait for it), one at a time: records
of concurrent requests never interleave, and each append is one write + fsync under the log's
file lock (gptdeploy/audit/append.py), which also orders appends from other processes (Ray
replicas sharing a log). close() waits for the appends in flight, so a shut-down server leaves a
log that `gptdeploy audit verify` passes.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gptdeploy.audit.record import AuditOptions, append_records, build_record
from gptdeploy.errors import GptDeployError
from gptdeploy.results import GenerationResult

FLOAT16 = AuditOptions()  # every layer and head, float16


class AuditSink:
    def __init__(self, path: str | os.PathLike, options: AuditOptions = FLOAT16):
        self.path = Path(path)
        self.options = options
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptdeploy-audit")

    @staticmethod
    def check(engine, path: str | os.PathLike) -> None:
        """Refuse, before serving, a graph that cannot record attention or a log that cannot be written."""
        graph = engine.runtime.graph
        if not graph.signature.attentions:
            raise GptDeployError(
                f"--audit needs attention outputs, and graph {graph.name!r} of this bundle has none "
                "(exported with --no-attentions); export the bundle with attentions to audit"
            )
        if Path(path).is_dir():
            raise GptDeployError(f"audit log {path} is a directory; give a file path")

    async def append(
        self,
        engine,
        result: GenerationResult,
        max_new_tokens: int,
        stop: list[str],
        stop_token_ids: list[int],
    ) -> dict:
        """Append the record of one finished request; its id {"index", "sha256"}."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._writer, self._append, engine, result, max_new_tokens, stop, stop_token_ids
        )

    def _append(self, engine, result, max_new_tokens, stop, stop_token_ids) -> dict:
        record = build_record(
            engine,
            result,
            max_new_tokens=max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            options=self.options,
        )
        append_records(self.path, [record])
        return {"index": record.index, "sha256": record.sha256}

    def close(self) -> None:
        self._writer.shutdown(wait=True)
