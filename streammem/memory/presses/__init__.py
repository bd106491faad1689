"""streammem.memory.presses: small composable KV-cache / token-set policies (kvpress style)."""

from streammem.memory.presses.base import ComposedPress, Press
from streammem.memory.presses.h2o import H2OPress
from streammem.memory.presses.kvmerger import KVMergerPress
from streammem.memory.presses.mikv import MiKVPress, dequantize, quantize
from streammem.memory.presses.sink_window import SinkWindowPress

#: name -> press class, for configs that name presses in JSON.
PRESSES = {"sink_window": SinkWindowPress, "h2o": H2OPress, "kvmerger": KVMergerPress, "mikv": MiKVPress}


def build_press(spec) -> Press:
    """A press from ``name``, ``(name, kwargs)`` or a list of those (composed in order)."""
    if isinstance(spec, Press):
        return spec
    if isinstance(spec, str):
        spec = (spec, {})
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        name, kwargs = spec
        if name not in PRESSES:
            raise ValueError(f"unknown press {name!r}; known: {sorted(PRESSES)}")
        kwargs = dict(kwargs)
        if name == "mikv" and "inner" in kwargs:
            kwargs["inner"] = build_press(kwargs["inner"])
        return PRESSES[name](**kwargs)
    if isinstance(spec, (list, tuple)):
        return ComposedPress([build_press(s) for s in spec])
    raise ValueError(f"a press spec is a name, (name, kwargs) or a list of those, got {spec!r}")


__all__ = ["Press", "ComposedPress", "SinkWindowPress", "H2OPress", "KVMergerPress", "MiKVPress", "quantize",
           "dequantize", "PRESSES", "build_press"]
