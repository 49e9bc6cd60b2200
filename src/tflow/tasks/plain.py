"""Plain data across the sandbox boundary: the only form in which a sample's outputs reach trusted code.

A sample's process pickles each output with `dumps_plain` (exact built-in types only; collections' Counter,
OrderedDict and defaultdict travel by value as dicts, since evalplus's own ground truth has Counters). Trusted code
reads them with `loads_plain`, whose unpickler resolves no global but `complex` and `dict`: a class, a subclass, a
numpy value, a function or any other object is an error there, whatever bytes the sample wrote. Pickle is used for
speed (MBPP+ outputs reach hundreds of MB); the reader runs in the judge process, under a memory limit.
"""
from __future__ import annotations

import builtins
import collections
import io
import pickle
from typing import Any


class NotPlain(TypeError):
    """A value that is not plain data."""


_BY_VALUE = (collections.Counter, collections.OrderedDict, collections.defaultdict)
_GLOBALS = {("builtins", "complex"), ("builtins", "dict")}


class _PlainPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:  # called for every object but exact None/bool/int/float/str/...
        if type(obj) is complex or obj is complex or obj is dict:  # the two globals loads_plain resolves
            return NotImplemented
        if type(obj) in _BY_VALUE:
            return dict, (dict(dict.items(obj)),)
        raise NotPlain(f"not plain data: {type(obj).__name__}")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return getattr(builtins, name)
        raise NotPlain("not plain data")


def dumps_plain(obj: Any) -> bytes:
    """Pickle plain data (protocol 5); NotPlain for anything else."""
    buf = io.BytesIO()
    _PlainPickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def loads_plain(data: bytes) -> Any:
    """Read what `dumps_plain` wrote; NotPlain, or another exception, for anything that is not plain data."""
    buf = io.BytesIO(data)
    obj = _PlainUnpickler(buf).load()
    if buf.read(1):
        raise NotPlain("trailing bytes")
    return obj
