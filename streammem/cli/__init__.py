"""The ``streammem`` command, one module per command group:

===============  =====================================================================
``run.py``       ``streammem info``, ``streammem run`` (the main job)
``detect.py``    ``streammem detect``, ``train detector``, ``eval detection``
``qa.py``        ``streammem ask``, ``train encoder|answerer|event-gate|qa-snapshots``,
                 ``eval qa``
``generate.py``  ``streammem generate``, ``train generator|recycle``, ``eval generation|drift``
``routing.py``   ``streammem eval routing``
``batch.py``     ``streammem batch`` (many videos: a process pool or Ray Data)
``world.py``     ``streammem world export|gallery``
``webcam.py``    ``streammem webcam`` (live detection or questions on a camera)
===============  =====================================================================

Commands are thin: they parse options and call the jobs in :mod:`streammem.pipelines.jobs`,
the trainers in :mod:`streammem.train` and the evaluations in :mod:`streammem.eval`.
"""

from streammem.cli import batch, detect, generate, qa, routing, run, webcam  # noqa: F401  (each module adds its commands)
from streammem.cli.common import app, eval_app, train_app
from streammem.cli.world import app as world_app

app.add_typer(world_app, name="world", help="StreamWorld: procedural video streams with ground truth")

__all__ = ["app", "train_app", "eval_app"]

if __name__ == "__main__":
    app()
