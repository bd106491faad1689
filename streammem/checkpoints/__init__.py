"""The shipped small models, one folder each (``config.json`` + weights ``*.safetensors`` + a
model card ``README.md``): ``grid_encoder``, ``answerer``, ``detector``, ``generator``.

Example:
    >>> path("detector").name
    'detector'
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent

__all__ = ["ROOT", "path"]


def path(name: str) -> Path:
    """The folder of the shipped checkpoint ``name``; FileNotFoundError naming the fix when it
    is missing."""
    folder = ROOT / name
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        known = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file() and any(p.glob("*.safetensors")))
        raise FileNotFoundError(f"no shipped checkpoint {name!r} at {folder} (config.json + weights .safetensors); "
                                f"shipped: {known}; `streammem train ...` makes one")
    return folder
