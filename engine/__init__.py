"""breathcast.engine: model packages (ONNX graphs + manifest), export, runtimes and the per-plan predictor.

May import breathcast (core), and breathcast.training only for export. Nothing here yet: see the engine issue.
"""
