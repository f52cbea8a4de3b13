"""The server process: configuration and wiring.

Lives here: the composition root that builds store, services, relay and background
loops (``bootstrap``; the entry points hand it their consumer), gunicorn's configuration
and worker (``gunicorn_conf``, ``gunicorn_worker``), JSON logging and redaction (``logs``,
``redaction``, ``access_log``) and Prometheus metrics (``metrics``).

May import: ``settings`` and the layers below it (``domain``, ``contract``, ``adapters``,
``services``); never ``entrypoints``, which stand above it, nor ``client``. ``redaction``
imports nothing of ours and ``logs`` only the domain's trace context, so every layer may
use them.
"""
