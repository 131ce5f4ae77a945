"""Narrative Canvas: photos -> classifier -> guarded story -> picture -> the story goes on, in one app.

Two layers, so the app is testable without a browser:

* ``canvas.NarrativeCanvas`` is the app's logic: which models and runtimes this machine can run (only those
  whose artifacts exist), classification, the story (streamed, guarded), the picture, the round trip.
  Plain Python, no widgets.
* ``widgets.NarrativeCanvasApp`` is the ipywidgets face: upload, dropdowns, buttons, a top-5 chart, the story
  as it streams, the picture. Long steps run on a worker thread (``Task``) with a progress bar and a
  Cancel button; an error shows as a message in the app (its traceback goes to ``<workspace>/app/app.log``).

``prepare_demo`` builds every artifact ahead of a live demo (``python -m course_utils prepare-demo``), and
``serve_command`` serves the app as a standalone page with Voila, on 127.0.0.1 unless told otherwise
(``python -m course_utils serve-app`` or ``make app``).
"""

