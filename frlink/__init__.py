"""The link between hosts, shared by the broker and the node: mutual TLS (``tls.py``
over the memory-BIO stream of ``biotls.py``), accepting a connection and negotiating on
it (``accept.py``), who may replicate what where (``authz.py``, from the peer's
certificate identity in ``identity.py``), and the private CA (``certs.py``; what its
certificates contain is in ``cert_contents.py``). Its configuration pieces (``config.py``)
are what every config file shares.

It imports only :mod:`frproto`; the broker, the recovery server, the primary and the
cluster node all build on it and on nothing of each other below them.
"""
