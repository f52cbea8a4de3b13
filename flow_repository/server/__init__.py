"""The server process: configuration and wiring.

Lives here: the settings read from the environment (``settings``), the composition root
that builds store, services, relay and consumer (``bootstrap``), gunicorn's configuration
and worker (``gunicorn_conf``, ``gunicorn_worker``), JSON logging and redaction (``logs``,
``redaction``, ``access_log``) and Prometheus metrics (``metrics``).

May import: anything of the server side (``domain``, ``contract``, ``adapters``,
``services``, ``entrypoints``); ``settings`` and ``redaction`` import nothing of ours and
``logs`` only the domain's trace context, so every layer may read them. Never ``client``.
"""
