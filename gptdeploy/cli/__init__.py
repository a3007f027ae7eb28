"""The `gptdeploy` command: a thin face over the library (click).

    main.py      the group, and the one place that maps errors to `error: ...` and exit code 2
    export.py    export, verify
    generate.py  generate
    serve.py     serve (the OpenAI-compatible HTTP server)
    audit.py     audit show | verify | report | export
    bench.py     bench
    engine.py    build-engine, doctor
"""

from gptdeploy.cli.main import cli, main

__all__ = ["cli", "main"]
