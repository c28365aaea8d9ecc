"""Deprecated: the names of ``jaxrank.salora`` are on ``jaxrank`` itself (see ``jaxrank._deprecated``)."""

from jaxrank import _deprecated

__getattr__ = _deprecated.module_getattr("jaxrank.salora", "jaxrank._salora", _deprecated.SALORA)
