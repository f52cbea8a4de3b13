"""Entry points: how requests and events reach the services.

Lives here: the Flask app factory (``app``) and its blueprints (``api``), the RabbitMQ
status and IAM consumer (``consumer``) and the command line (``cli``). They parse, call a
service and render; no business rule lives here.

May import: ``services``, ``domain``, ``contract``, ``adapters`` and ``server``; ``cli``
also hands the client's sub-commands to ``client.cli``. Nothing imports them but
``server.bootstrap`` (for the consumer) and the process entry points.
"""
