"""compilekit: recipe -> torch.export -> passes -> ONNX Runtime / TensorRT, verified at every step."""

__version__ = "0.1.0"
