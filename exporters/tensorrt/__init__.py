"""Bundle -> TensorRT engine (needs TensorRT and an NVIDIA GPU only when building).

    operators.py  the ONNX operators, types and restrictions TensorRT's parser accepts (generated)
    checks.py     static checks of a graph against that table, and its fp32 precision islands
    builder.py    the TensorRT builder: strongly typed network, one profile per phase, timing cache
    build.py      build_engine: checks, build, write under engines/, record in the manifest

Engine names, manifest entries, the compatibility check and the optimization profiles are
part of the bundle contract, read by the runtime too: gptdeploy/engines.py, gptdeploy/profiles.py.
The TensorRT import check and logger live on the run side (runtimes/trt.py): exporters may import
runtimes, never the reverse. The fp16 rules themselves are exporters/fp16.py's, shared with export.
"""

from gptdeploy.exporters.tensorrt.build import build_engine

__all__ = ["build_engine"]
