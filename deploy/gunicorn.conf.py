"""Gunicorn settings for ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``: the package's own."""

from flow_repository.server.gunicorn_conf import *
