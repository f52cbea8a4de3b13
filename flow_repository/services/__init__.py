"""Use cases shared by the API and the worker: the one place where the rules about flows live.

Lives here: the flow, lifecycle and history use cases (``flows``, ``lifecycle``,
``history``), each a class that gets its collaborators handed in; ``FlowService``, which
wires them together; what they share: who sees a flow (``access``), bulk items (``bulk``),
bounded pages (``listing``), history entries and their recording (``entries``,
``recorder``), parsing of ids and If-Match (``parsing``) and the results (``results``).

May import: ``domain``, ``contract`` and the adapters' interfaces (``adapters``, and
``settings``); never pika, pymongo, sqlite3 or flask, nor ``entrypoints``, the rest
of ``server`` or ``client``.
"""

from __future__ import annotations

from .flow_service import FlowService
from .listing import Page
from .parsing import parse_flow_id, parse_if_match
from .results import DryRun, InvalidEvent, ItemResult, Saved, Shown

__all__ = ["DryRun", "FlowService", "InvalidEvent", "ItemResult", "Page", "Saved", "Shown",
           "parse_flow_id", "parse_if_match"]
