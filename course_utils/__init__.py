"""course_utils: the heavy lifting behind the Transfer-Learning Workbook's notebooks.

Layers, each importing only the layers listed above it (import-linter checks them, ``[tool.importlinter]``
in pyproject.toml):

* ``core``: config, environment, errors, the ledger and its typed stage records (torch-free), timing.
* ``vision``: datasets, the model zoo, fine-tuning, pruning, the deployed model and PyTorch inference.
* ``deploy``: ONNX export, runtimes and the benchmark, TensorRT engines, calibration, PTQ and QAT.
* ``genai``: the LLM client, guarded stories, pictures and speech.
* ``app``: the Narrative Canvas app, which reads the stage records, and ``prepare-demo``.
* ``lessons`` (the notebooks' exercise checks) and the CLI (``cli``, ``doctor``) may import any layer.

Each model stage has one entry point (its module's ``run``; the final benchmark's is
``final_benchmark.run``).
Heavy stacks (torch, onnxruntime, TensorRT, diffusers…) are imported inside the functions that use them.
"""

__version__ = "0.1.0"
