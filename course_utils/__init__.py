"""course_utils: the heavy lifting behind the Transfer-Learning Workbook's notebooks.

One module per pipeline stage; none imports a later stage. Heavy stacks (torch, onnxruntime,
TensorRT, diffusers…) are imported inside the functions that use them.
"""

__version__ = "0.1.0"
