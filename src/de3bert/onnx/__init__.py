"""ONNX: the exported folder's format, the exporter, and the exported model on ONNX Runtime.

Dependencies run one way: the exporter and the runtime both read `format.py` and `sessions.py`; neither
imports the other.
"""
