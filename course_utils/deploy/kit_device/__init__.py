"""The deploy kit's device side: ``trt_kit.py`` runs on the Jetson's own Python 3.8+ with TensorRT and numpy.

The course never imports it: ``course_utils.deploy.jetson_kit`` copies the file verbatim into every kit, and
the tests load it (with a recording stand-in of TensorRT) to check what it asks TensorRT for.
"""
