"""Layer 3, deploy: ONNX export and graph optimization, runtimes, TensorRT engines, calibration, PTQ and QAT.
Imports ``core`` and ``vision``."""
