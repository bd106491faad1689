"""Loading Hugging Face models named by ``hf:<model id or local folder>``: spec parsing, device
and dtype, and the one-line error when the hub cannot be reached.

A model spec is ``hf:`` followed by a hub id (``hf:HuggingFaceTB/SmolVLM2-256M-Video-Instruct``)
or a local folder (``hf:/data/models/owlv2``, ``hf:./weights``). A folder that exists is loaded
from disk without touching the network; anything else is a hub id, fetched (or taken from the
local hub cache) by ``transformers``.

Devices: :func:`pick_device` follows ``accelerate`` (CUDA, then Apple's MPS, then the CPU;
``device="auto"`` spreads a big model with ``device_map="auto"``), and :func:`pick_dtype` uses
bfloat16 on a GPU that supports it, float16 on other accelerators and float32 on the CPU.

Example:
    >>> parse_spec("hf:org/model")
    'org/model'
    >>> parse_spec("small") is None
    True
    >>> str(pick_device("cpu")), pick_dtype("cpu")
    ('cpu', torch.float32)
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

__all__ = ["HubUnavailable", "parse_spec", "is_local", "pick_device", "pick_dtype", "hub_errors", "load_hf",
           "require_transformers"]

T = TypeVar("T")


class HubUnavailable(RuntimeError):
    """A model could not be fetched from the Hugging Face hub (no network, unknown id, gated
    repository); the message is one line saying what and how to pass a local folder."""


def parse_spec(spec: str | None) -> str | None:
    """The model id or folder of an ``hf:`` spec; ``None`` for any other name."""
    if spec is None or not spec.startswith("hf:"):
        return None
    name = spec[3:].strip()
    if not name:
        raise ValueError("hf: needs a model id or a local folder after it, e.g. hf:PekingU/rtdetr_r18vd")
    return name


def is_local(name: str) -> bool:
    """Whether ``name`` is a folder on this machine (it is then loaded without the network)."""
    return Path(os.path.expanduser(name)).is_dir()


def pick_device(device: str | torch.device | None = None) -> torch.device | str:
    """``device`` as given, or accelerate's choice (CUDA, MPS, ... else CPU) for ``None``;
    ``"auto"`` is passed through (``device_map="auto"``)."""
    if device is not None:
        return device if str(device) == "auto" else torch.device(device)
    try:
        from accelerate import PartialState

        return PartialState().device
    except Exception:  # accelerate missing or unable to probe: the CPU always works
        return torch.device("cpu")


def pick_dtype(device: str | torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``dtype`` as given (``"float32"``, ``torch.bfloat16`` ...), else bfloat16 on a GPU that has
    it, float16 on other accelerators, float32 on the CPU."""
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kind = "cuda" if str(device) == "auto" and torch.cuda.is_available() else torch.device(
        "cpu" if str(device) == "auto" else device).type
    if kind == "cpu":
        return torch.float32
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def require_transformers() -> Any:
    """``import transformers`` with an error naming the extra that installs it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in the dev extra
        raise ImportError("hf: models need transformers: pip install 'streammem[hf]'") from e
    return transformers


@contextlib.contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """Turn a failure to fetch ``name`` from the hub into :class:`HubUnavailable` (one line);
    errors while loading a local folder pass through unchanged."""
    for logger in ("huggingface_hub", "transformers"):  # their retries and warnings go to the log
        logging.getLogger(logger).setLevel(max(logging.getLogger(logger).level, logging.ERROR))
    try:
        yield
    except (OSError, ValueError) as e:
        if is_local(name):
            raise
        text = str(e)
        offline = any(k in text.lower() for k in ("connect", "offline", "resolve", "timed out", "network",
                                                  "couldn't", "could not", "not a local folder", "does not appear",
                                                  "is not a valid model identifier", "gated", "401", "404"))
        if not offline and type(e).__module__.split(".")[0] not in ("huggingface_hub", "requests", "urllib3"):
            raise
        raise HubUnavailable(
            f"could not fetch '{name}' from the Hugging Face hub ({type(e).__name__}); on a machine with access run "
            f"`hf download {name} --local-dir DIR` and pass hf:DIR") from None


def load_hf(name: str, loader: Callable[..., T], **kwargs: Any) -> T:
    """``loader(name, **kwargs)`` (a ``from_pretrained``) under :func:`hub_errors`; a local
    folder is loaded with ``local_files_only=True`` so that nothing touches the network."""
    path = os.path.expanduser(name) if is_local(name) else name
    if is_local(name):
        kwargs.setdefault("local_files_only", True)
    with hub_errors(name):
        return loader(path, **kwargs)
