"""``SafeHubMixin``: huggingface_hub's ``PyTorchModelHubMixin`` (``config.json`` +
``model.safetensors``, ``save_pretrained`` / ``from_pretrained``) with two changes for
streammem's checkpoints:

- a checkpoint that lacks some of the model's parameters (or has extra ones) loads with a
  ``UserWarning`` naming them, instead of silently (huggingface_hub loads non-strictly and says
  nothing); missing parameters keep their initial values, which is what a resumed training
  with a new, zero-initialised part wants. ``from_pretrained(..., strict=True)`` raises instead;
- pickled weights (``pytorch_model.bin``, the mixin's fallback for hub repositories without a
  safetensors file) are refused: streammem never unpickles a file a user hands it;
- the mixin's "Loading weights from local directory" line on stdout is not printed.

Example:
    >>> import torch, tempfile, warnings
    >>> class Small(torch.nn.Module, SafeHubMixin):
    ...     def __init__(self, extra: bool = False):
    ...         super().__init__()
    ...         self.a = torch.nn.Linear(2, 2)
    ...         self.b = torch.nn.Linear(2, 2) if extra else None
    >>> d = tempfile.mkdtemp()
    >>> Small().save_pretrained(d)
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     m = Small.from_pretrained(d, extra=True)
    >>> "b.weight" in str(w[0].message)
    True
"""

from __future__ import annotations

import contextlib
import io
import warnings

from huggingface_hub import PyTorchModelHubMixin

__all__ = ["SafeHubMixin"]


class SafeHubMixin(PyTorchModelHubMixin):
    """``PyTorchModelHubMixin`` that names missing / unexpected weights and refuses pickles."""

    @classmethod
    def _from_pretrained(cls, *args, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints where it loads from
            return super()._from_pretrained(*args, **kwargs)

    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):
        import safetensors.torch

        missing, unexpected = safetensors.torch.load_model(model, model_file, strict=strict, device=map_location)
        if missing:
            warnings.warn(f"{model_file}: {type(model).__name__} parameters not in the checkpoint, left at their "
                          f"initial values: {', '.join(sorted(missing))}", stacklevel=4)
        if unexpected:
            warnings.warn(f"{model_file}: checkpoint entries {type(model).__name__} does not have, ignored: "
                          f"{', '.join(sorted(unexpected))}", stacklevel=4)
        model.eval()
        return model

    @classmethod
    def _load_as_pickle(cls, model, model_file: str, map_location: str, strict: bool):
        raise ValueError(f"{model_file}: refusing to load pickled weights; streammem loads model.safetensors only "
                         "(convert the checkpoint with safetensors.torch.save_model)")
