"""The client side: the REST client (``rest``), its command line (``cli``) and GitOps.

It ships with the server but shares only the wire contract with it.

May import: ``flow_repository.contract`` (the plain wire constants) and itself; nothing of
the server.
"""
