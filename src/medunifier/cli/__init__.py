"""The `medunifier` command line.

One module per command group: `data` (datasets and manifests), `pretrain` (stage 0 and stage 1), `eval`,
`generate`, `serve` (report, classify, ask, index, serve), `config` and `demo`; `main` assembles them into `app`.
Implementations are imported inside each command so that `medunifier --help` stays fast.
"""

from medunifier.cli.main import app, main

__all__ = ["app", "main"]
