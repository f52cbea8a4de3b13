"""Domain rules: what a flow is and may become, with no I/O.

Lives here: the lifecycle (statuses and the transition table), graph rules, errors and
problems (``flow``), who may see and change a flow (``ownership``), list paging
(``paging``) and the W3C trace context a change is made in (``trace``).

May import: the standard library only; nothing else of ``flow_repository``.
"""
