"""The `torch` runtime: the canonical module (gptdeploy.modeling.GPT) run directly; the reference.

A bundle carries no torch checkpoint, so the weights come from the graph's initializers, read
by name through the manifest's weights map (`graphs.<name>.weights`: canonical parameter ->
initializer, as stored or transposed), which the exporter found by value in the final graph.
That holds for every float graph, fused or not, whatever its node names. int8/int4 graphs hold
no float Linear weights, so they are refused. Bundles written before the map existed are read
by the tracer's node names (`graph_state_dict`), which works for unfused graphs only.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from gptdeploy.bundle import Bundle
from gptdeploy.errors import BackendUnavailable, BundleError, SourceError
from gptdeploy.manifest import QUANTIZED, GraphEntry, WeightRef
from gptdeploy.modeling import GPT, load_state, to_fp16
from gptdeploy.runtimes.base import RuntimeBase, StepOutput

log = logging.getLogger(__name__)

def mapped_state_dict(proto: onnx.ModelProto, weights: dict[str, WeightRef], base_dir: str) -> dict[str, np.ndarray]:
    """Canonical state dict (float32 arrays) read from the initializers the weights map names."""
    inits = {t.name: t for t in proto.graph.initializer}
    absent = sorted({ref.initializer for ref in weights.values()} - set(inits))
    if absent:
        raise BundleError(
            f"the graph has no initializer {', '.join(absent[:4])} that its manifest's weights map names; "
            "the bundle is inconsistent: re-export it (gptdeploy export SOURCE -o OUT)"
        )
    arrays: dict[str, np.ndarray] = {}  # one read per initializer, however many parameters share it
    state = {}
    for name, ref in weights.items():
        if ref.initializer not in arrays:
            arrays[ref.initializer] = numpy_helper.to_array(inits[ref.initializer], base_dir)
        value = arrays[ref.initializer]
        state[name] = np.array(value.T if ref.transposed else value, dtype=np.float32, order="C")  # writable, for torch
    return state


def graph_state_dict(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Canonical state dict (module path -> float32 array) found by the tracer's node names: for
    unfused graphs of bundles without a weights map. The tracer stores identical tensors once,
    so `h.1.ln_1.weight` may exist only as an input of node `/m/h.1/ln_1/LayerNormalization`."""
    g = proto.graph
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:  # deduplicated weights reappear as Identity outputs
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    state: dict[str, np.ndarray] = {}
    for node in g.node:
        module = _module_path(node.name)
        consts = [n for n in node.input if n in values]
        if not consts or not module:
            continue
        if node.op_type == "Gather":  # wte / wpe lookups
            state[f"{module}.weight"] = values[node.input[0]]
        elif node.op_type == "LayerNormalization":
            state[f"{module}.weight"] = values[node.input[1]]
            if len(node.input) > 2 and node.input[2] in values:
                state[f"{module}.bias"] = values[node.input[2]]
        elif node.op_type == "MatMul" and node.input[1] in values:
            state[f"{module}.weight"] = values[node.input[1]].T  # [in, out] -> nn.Linear [out, in]
        elif node.op_type == "Add" and len(consts) == 1 and module.endswith(("c_attn", "c_proj", "c_fc")):
            state[f"{module}.bias"] = values[consts[0]]
    return {k: np.array(v, dtype=np.float32) for k, v in state.items()}  # writable copies for torch


def _module_path(node_name: str) -> str:
    """`/m/h.0/attn/c_attn/MatMul` -> `h.0.attn.c_attn` (the exporter wraps GPT as `m`)."""
    parts = node_name.strip("/").split("/")[:-1]
    if parts and parts[0] == "m":
        parts = parts[1:]
    return ".".join(parts)


def load_graph_model(bundle: Bundle, graph: GraphEntry, backend: str) -> GPT:
    """The canonical module (fp32, on the CPU) with the weights of `graph`."""
    if graph.precision in QUANTIZED:
        raise BackendUnavailable(
            f"graph {graph.name!r} holds {graph.precision} weights; the {backend} runtime runs fp32 and fp16 "
            f"graphs: use --backend ort, or export without --{graph.precision} for a {backend} reference"
        )
    path = bundle.file(graph.file)
    try:  # external data is read per tensor, and only for the initializers the map names
        proto = onnx.load(str(path), load_external_data=graph.weights is None)
        if graph.weights is not None:
            state = mapped_state_dict(proto, graph.weights, str(path.parent))
        else:
            state = graph_state_dict(proto)
    except (OSError, ValueError, DecodeError) as exc:
        raise BundleError(f"cannot read graph {graph.file!r}: {exc}") from None
    del proto
    with torch.device("meta"):  # no random init: load_state assigns the arrays read from the graph
        model = GPT(bundle.config)
    try:
        load_state(model, {k: torch.from_numpy(v) for k, v in state.items()})
    except SourceError as exc:
        how = (
            "its manifest's weights map does not cover the model: re-export the bundle"
            if graph.weights is not None
            else "the bundle predates the manifest's weights map, and the graph's node names (a fused "
            "graph's?) do not show every weight: re-export it with this gptdeploy (gptdeploy export "
            "SOURCE -o OUT), or use --backend ort"
        )
        raise BundleError(f"the {backend} runtime cannot rebuild the model from graph {graph.name!r} ({exc}); {how}") from None
    return model


class TorchRuntime(RuntimeBase):
    """On the CPU in fp32 (the reference). On a GPU (`torch-cuda`), in the graph's precision:
    an fp16 graph runs as `to_fp16` makes the model (fp16 weights and KV cache; norms, rotary,
    softmax and logits in fp32), which is the PyTorch-eager fp16 baseline for TensorRT. Every
    family: the manifest's model config describes the block, and the weights map names its tensors."""

    name = "torch"

    def __init__(self, bundle: Bundle, graph: GraphEntry, threads: int | None, device: str = "cpu"):
        super().__init__(bundle, graph)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.name = "torch-cuda"
        model = load_graph_model(bundle, graph, self.name)
        if self.device.type == "cuda":
            if graph.precision == "fp16":
                to_fp16(model)  # exact: the fp16 graph's weights were fp16 before the fp32 copy
            model.to(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._kv_dtype = model.wte.weight.dtype  # the KV cache is kept in the weights' dtype, as in export
        self.model = model.eval()
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: torch has no per-module thread pool
        self._past: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _prefill(self, input_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(
            input_ids,
            attention_mask,
            position_ids,
            [(k.to(self.device), v.to(self.device)) for k, v in self.model.empty_past(input_ids.shape[0], self._kv_dtype)],
            record_attention,
        )

    def _decode(self, next_ids, attention_mask, position_ids, record_attention) -> StepOutput:
        return self._run(next_ids, attention_mask, position_ids, self._past, record_attention)

    def _run(self, ids, mask, pos, past, record_attention) -> StepOutput:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)
        with torch.inference_mode():
            logits, presents, attentions = self.model(t(ids), t(mask), t(pos), past, last_logits_only=True)
        self._past = presents
        # (B, nh, T, P+T); .cpu() waits for the GPU, so a step's wall time is its real time
        atts = [a.float().cpu().numpy() for a in attentions] if record_attention else None
        return StepOutput(logits=logits[:, -1, :].float().cpu().numpy(), attentions=atts)  # (B, V)

    @property
    def peak_device_mb(self) -> float | None:
        """Peak GPU memory torch's allocator handed out since load (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def _take_cache(self) -> list[np.ndarray]:  # K0, V0, K1, V1, ... as the signature orders pasts
        return [t.float().cpu().numpy().astype(self.graph.signature.kv_dtype) for kv in self._past for t in kv]

    def _put_cache(self, arrays: list[np.ndarray]) -> None:
        t = [torch.from_numpy(a).to(self.device, self._kv_dtype) for a in arrays]
        self._past = list(zip(t[0::2], t[1::2]))

    def _drop_cache(self) -> None:
        self._past = []

    def _release(self) -> None:
        self.model = None


def open_runtime(bundle: Bundle, graph: GraphEntry, threads: int | None) -> TorchRuntime:
    return TorchRuntime(bundle, graph, threads)
