"""The DNS responder (I/O): a process of its own that answers where each instance is, fed by the
reconciler (see :mod:`reconciler.responder.server`), with its supervisor and the reconciler's client."""
