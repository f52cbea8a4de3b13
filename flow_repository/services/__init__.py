"""Use cases shared by the API and the worker: the one place where the rules about flows live.

Lives here: the flow, lifecycle and history use cases and the results they return.

May import: ``domain``, ``contract`` and the adapters' interfaces (``adapters``, and
``server.settings``); never pika, pymongo, sqlite3 or flask, nor ``entrypoints``, the rest
of ``server`` or ``client``.
"""

from __future__ import annotations

from .common import DryRun, InvalidEvent, ItemResult, Saved, parse_flow_id, parse_if_match
from .flows import FlowUseCases
from .history import HistoryUseCases
from .lifecycle import LifecycleUseCases

__all__ = ["DryRun", "FlowService", "InvalidEvent", "ItemResult", "Saved", "parse_flow_id",
           "parse_if_match"]


class FlowService(FlowUseCases, LifecycleUseCases, HistoryUseCases):
    """Every use case, reached by the API routes and by the worker alike."""
