"""Launch the streammem web demo: ``python serve.py``.

The Gradio app itself (demos/app.py, per-session memories) comes with the web-demo issue;
until then this launcher says so instead of failing obscurely.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from demos.app import main as app_main  # noqa: F401
    except ImportError:
        print(
            "streammem: the web demo (demos/app.py) is not built yet. "
            "Use `streammem run SOURCE --out DIR` for the main job.",
            file=sys.stderr,
        )
        return 1
    return app_main()


if __name__ == "__main__":
    raise SystemExit(main())
