"""Launch the streammem web demo: ``python serve.py [--host H] [--port P] [--share] [--answerer SPEC] [--detector hf:ID [--classes NAMES]]``.

The Gradio app itself is ``demos/app.py`` (importable: ``build_app()`` returns the Blocks);
``python serve.py --help`` lists the options (upload and video-length limits, concurrency).
``--share`` (a public gradio.live link) is off by default; ``--host 0.0.0.0`` serves every
interface of this machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `demos` next to this file, from any folder


def main(argv: list[str] | None = None) -> int:
    from demos.app import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
