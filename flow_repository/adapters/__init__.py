"""Adapters: everything that talks to the world outside the process.

Lives here: the store backends (``store``: SQLite and MongoDB behind one contract),
identity (``auth``: IAM introspection, JWT, dev tokens), the outbox entry and OIH
envelope (``outbox``), the RabbitMQ publisher (``rabbitmq``), the outbox relay
(``relay``), the component/secret reference checks (``references``), the step logs
client (``step_logs``) and the OpenTelemetry spans (``tracing``, the only module that
imports the optional SDK).

May import: ``domain``, ``contract``, ``settings`` and other adapters; never
``services``, ``entrypoints`` or the rest of ``server``. Only ``store`` backends import
pymongo or sqlite3; only ``rabbitmq`` and ``relay`` (and the consumer) touch pika.
"""
