"""The wire contract shared by the server and the client.

Lives here: the field names of a flow body as the REST API reads and writes them, and the
sort keys of a flow list (this module, plain Python so the client can import it), and the
server's marshmallow schemas that validate and document that contract (``schemas``).

May import: this module imports nothing of ours; ``schemas`` imports ``domain`` and this
module. Server layers may import both; the client imports this module only.
"""

from __future__ import annotations

import json
from typing import Any

# Fields the service writes itself: a client may send them back unchanged (e.g. a GET body
# edited and PATCHed) and they are ignored. ``status`` is different: the same status as the
# flow's is ignored too, but asking for another one is a request the service cannot honour
# through this route, so it is refused.
READ_ONLY_FIELDS = ("id", "_id", "createdAt", "updatedAt", "revision", "tenant",
                    "statusChangedAt", "statusReason")
EDITABLE_FIELDS = ("name", "description", "type", "graph", "owners", "cron",
                   "fromTemplate", "flowSettings")
SORT_FIELDS = ("createdAt", "updatedAt", "name")  # a list's ``sort`` keys, each also as -key


def json_text(value: Any) -> str:
    """``value`` as the API writes JSON: compact, keys sorted, ASCII (as Flask's jsonify)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def error_body(status: int, *messages: str) -> dict[str, list[dict[str, object]]]:
    """The one error shape of the service: ``{"errors": [{"message", "code"}]}``."""
    return {"errors": [{"message": message, "code": status} for message in messages]}
