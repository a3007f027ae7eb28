"""Export-time side of gptdeploy (needs torch): sources, ONNX export, quantization, TensorRT."""


def __getattr__(name: str):
    if name in ("export_bundle", "ExportResult"):
        from gptdeploy.exporters import export

        return getattr(export, name)
    raise AttributeError(f"module 'gptdeploy.exporters' has no attribute {name!r}")


__all__ = ["ExportResult", "export_bundle"]
