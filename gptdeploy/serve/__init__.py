"""`gptdeploy serve`: the batching engine behind an OpenAI-compatible HTTP API.

    service.py   ServeConfig; Service: the engine, model name, chat template, audit sink, metrics
    schemas.py   request bodies: every field's type and range, checked before any work
    app.py       the Starlette app: /v1/completions, /v1/chat/completions (plain or SSE), /v1/models,
                 /health, /metrics
    shapes.py    response bodies and stream chunks as OpenAI's clients parse them
    errors.py    OpenAI-style error bodies; library errors mapped to 4xx (the caller's) or 500 in one place
    auth.py      Bearer API key, compared in constant time
    audit.py     audit records appended while serving, one writer
    metrics.py   Prometheus metrics
    run.py       uvicorn, SIGTERM with a grace period
    rayserve.py  the same app as a Ray Serve deployment, scaled out over replicas

Needs the `serve` extra (starlette, uvicorn, prometheus_client); Ray Serve the `ray` extra.
"""
