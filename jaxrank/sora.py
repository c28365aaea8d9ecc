"""Deprecated: the names of ``jaxrank.sora`` are on ``jaxrank`` itself (see ``jaxrank._deprecated``)."""

from jaxrank import _deprecated

__getattr__ = _deprecated.module_getattr("jaxrank.sora", "jaxrank._sora", _deprecated.SORA)
