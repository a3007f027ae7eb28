"""What one server (or one Ray Serve replica) holds: the engine, the model's name and chat
template, the audit sink and the metrics; and how a checked HTTP request becomes engine
requests. Nothing here knows HTTP; app.py does. Nothing in a request reaches the filesystem:
the bundle, template and audit log are the operator's, fixed at start.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptdeploy.audit.record import AuditOptions
from gptdeploy.engine import Engine, EngineLimits, Ticket
from gptdeploy.errors import GenerationError
from gptdeploy.options import GenerationOptions, check_ids, encode
from gptdeploy.serve.audit import AuditSink
from gptdeploy.serve.errors import ApiError
from gptdeploy.serve.metrics import Metrics
from gptdeploy.serve.schemas import Parsed


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    model: str | None = None  # the name clients send; default: the bundle directory's name
    backend: str = "auto"
    graph: str | None = None
    threads: int | None = None
    verify_hashes: bool = True
    max_batch: int = 8
    max_queue: int = 64  # waiting requests; beyond: 429
    request_timeout: float | None = 600.0  # seconds from arrival to the last token
    audit_log: Path | None = None
    audit_float32: bool = False
    api_key: str | None = field(default=None, repr=False)  # None: no Authorization needed; never logged
    max_body_bytes: int = 1 << 20
    grace: float = 30.0  # on SIGTERM: seconds for requests in flight to finish
    chat_template: Path | None = None  # the operator's override of the bundle's template

    def __post_init__(self) -> None:
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise GenerationError(f"the request timeout must be > 0 seconds, got {self.request_timeout!r}")
        if not self.max_body_bytes > 0 or not self.grace >= 0:
            raise GenerationError("the body limit must be > 0 bytes and the grace period >= 0 seconds")


class Service:
    """Owns its engine (given or loaded) and audit sink: close() releases them. `replica` labels
    the metrics of one replica among several (Ray Serve's replica id)."""

    def __init__(self, config: ServeConfig, engine: Engine | None = None, replica: str | None = None):
        self.config = config
        self.metrics = Metrics(lambda: self.engine.occupancy(), replica)
        self.engine = engine or Engine.load(
            config.bundle,
            config.backend,
            config.graph,
            config.threads,
            config.verify_hashes,
            EngineLimits(max_batch=config.max_batch, max_queue=config.max_queue),
            on_step=self.metrics.step,
        )
        self.model = config.model or Path(config.bundle).resolve().name
        self.audit = None
        try:
            if config.audit_log is not None:
                AuditSink.check(self.engine, config.audit_log)
                self.audit = AuditSink(
                    config.audit_log, AuditOptions(dtype="float32" if config.audit_float32 else "float16")
                )
            self.template = self._template()
        except BaseException:  # a service that never started releases what it already holds
            self.close()
            raise
        self.created = int(time.time())
        self.draining = False
        self._ids = itertools.count()
        self._prefix = secrets.token_hex(4)  # request ids differ across restarts and replicas

    def _template(self):
        from gptdeploy.chat import ChatTemplate, NoChatTemplate  # jinja2, only for a chat endpoint

        try:
            return ChatTemplate.from_bundle(self.engine.bundle, self.config.chat_template)
        except NoChatTemplate:  # completions still work; chat answers why it cannot
            return None

    def request_id(self, kind: str) -> str:
        return f"{kind}-{self._prefix}{next(self._ids):06d}"

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def submit(self, parsed: Parsed, rid: str) -> list[Ticket]:
        """Engine requests for a checked HTTP request, one per prompt, queued together."""
        ids = self._prompt_ids(parsed)
        fields = dict(parsed.options, record_attention=self.audit is not None)
        if fields["max_new_tokens"] is None:  # chat without max_tokens: the room the context leaves
            fields["max_new_tokens"] = max(1, self.engine.max_context - max(len(p) for p in ids))
        req = self.engine.check(ids, GenerationOptions(**fields), stream=parsed.stream)
        tickets = self.engine.enqueue(req, self.config.request_timeout, rid)
        for t in tickets:  # tokens and timings count when the engine ends each one, cancelled too
            t.add_done_callback(self.metrics.ticket_ended)
        return tickets

    def _prompt_ids(self, parsed: Parsed) -> list[list[int]]:
        tok = self.engine.tokenizer
        if parsed.messages is not None:
            if self.template is None:
                raise ApiError(
                    400,
                    "this server's model has no chat template; its operator can give one with "
                    "`gptdeploy serve --chat-template FILE`",
                    param="messages",
                    code="no_chat_template",
                )
            from gptdeploy.chat import prompt_ids

            return [prompt_ids(tok, self.template.render(parsed.messages))]
        vocab = self.engine.bundle.config.vocab_size
        return [encode(tok, p) if isinstance(p, str) else check_ids(p, vocab) for p in parsed.prompts]

    async def audit_record(self, ticket: Ticket, parsed: Parsed) -> dict | None:
        if self.audit is None:
            return None
        o = parsed.options
        return await self.audit.append(
            self.engine, ticket.result, ticket.max_new_tokens, o["stop"], o["stop_token_ids"]
        )

    def drain(self) -> None:
        """SIGTERM: refuse new requests (503); those in flight have the grace period to finish."""
        self.draining = True
        self.engine.stop_accepting(self.config.grace)

    def close(self) -> None:
        self.draining = True
        try:
            self.engine.close(grace=0)
        finally:
            if self.audit is not None:
                self.audit.close()
