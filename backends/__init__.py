"""Backends, one module each, installed as ``edgeserve.backends``; looked up by name through
``edgeserve.backend.REGISTRY`` and imported only when chosen."""
