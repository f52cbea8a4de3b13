"""Gunicorn entry point: ``wsgi:app`` builds the service from the environment."""

from flow_repository.entrypoints.app import create_app

app = create_app(background=True)
