"""FlowService: the use cases wired together, as the API routes and the worker reach them."""

from __future__ import annotations

from typing import Any

from flow_repository.adapters.references import ReferenceChecker
from flow_repository.adapters.step_logs import StepLogClient
from flow_repository.adapters.store import Store
from flow_repository.domain import flow as domain
from flow_repository.domain import ownership

from .access import FlowAccess
from .flows import FlowUseCases
from .history import HistoryUseCases
from .lifecycle import LifecycleUseCases
from .recorder import HistoryRecorder, RelayLink


class _Of:
    """A method of FlowService that is a use case group's own method of the same name."""

    def __init__(self, group: str) -> None:
        self._group = group
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, service: Any, owner: type | None = None) -> Any:
        if service is None:
            return self
        return getattr(getattr(service, self._group), self._name)


class FlowService:
    """Every use case behind one object. Each group is its own class (``flows``,
    ``lifecycle``, ``history``) and gets what it uses handed in; the methods below are
    theirs, named here so that callers need not know which group holds which."""

    get = _Of("flows")
    list = _Of("flows")
    step_logs = _Of("flows")
    create = _Of("flows")
    create_dry_run = _Of("flows")
    create_many = _Of("flows")
    update = _Of("flows")
    update_dry_run = _Of("flows")
    update_many = _Of("flows")
    delete = _Of("flows")
    start = _Of("lifecycle")
    stop = _Of("lifecycle")
    start_many = _Of("lifecycle")
    stop_many = _Of("lifecycle")
    apply_status_event = _Of("lifecycle")
    remove_owner = _Of("lifecycle")
    reconcile = _Of("lifecycle")
    revisions = _Of("history")
    revision = _Of("history")
    diff = _Of("history")
    restore = _Of("history")
    record_pending_history = _Of("recorder")
    together = _Of("recorder")

    def __init__(
        self,
        store: Store,
        *,
        timeouts: domain.Timeouts,
        bulk_max_items: int = 100,
        history_max_revisions: int = 100,
        references: ReferenceChecker | None = None,
        relay: RelayLink | None = None,
        step_logs: StepLogClient | None = None,
        ownership_policy: str = ownership.STRICT,
        max_list_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        access = FlowAccess(store, ownership_policy)
        self.recorder = HistoryRecorder(store, history_max_revisions=history_max_revisions,
                                        relay=relay)
        self.flows = FlowUseCases(store=store, access=access, recorder=self.recorder,
                                  bulk_max_items=bulk_max_items, max_list_bytes=max_list_bytes,
                                  references=references, step_log_client=step_logs)
        self.lifecycle = LifecycleUseCases(store=store, access=access, recorder=self.recorder,
                                           timeouts=timeouts, bulk_max_items=bulk_max_items)
        self.history = HistoryUseCases(store=store, access=access, recorder=self.recorder,
                                       flows=self.flows, max_list_bytes=max_list_bytes)

