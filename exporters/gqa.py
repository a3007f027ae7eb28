"""The fused attention pass: each layer's attention as one `com.microsoft.GroupQueryAttention`.

One pass for every family. It finds each layer by the model's own weights, never by the tracer's
node names: the initializer holding `h.{i}.attn.c_attn.weight` (found by value, as the manifest's
weights map is) is read by the qkv projection, the one holding `h.{i}.attn.c_proj.weight` by the
output projection; everything between them is replaced, and what the model description says
decides what the replacement computes:
::
    qkv (B, T, (nh + 2 nkv) hs) ──────────────────────────────────────────┐  (packed)
      or ─Split─ q, k, v ─[q/k RMSNorm]─[RotaryEmbedding]─ q, k, v ──────┤
    past_key_values.{i}.key/.value ─────────────────────────────────────┤
    seqlens_k, total_sequence_length, query_seqlens (from the mask) ────┼─GroupQueryAttention─ y ─ c_proj
    cos/sin caches, position_ids (rotary, inside the op) ───────────────┤      ├─ present.{i}.key/.value
    attention_bias (B, 1, T, S): 0 / finfo.min from attention_mask ─────┘      └─ [attentions.{i}]

- Positions: every row is full length in the cache (S slots, pads included), so seqlens_k is
  S - 1 for every row and the op's causal mask is the contract's; pads are masked by the additive
  bias, finfo.min as in the unfused graph (a fully masked pad row stays finite).
- Rotary: inside the op (do_rotary, cos/sin caches of block_size rows computed as
  modeling.rope_inv_freq does, each row's own position_ids). onnxruntime 1.32's CPU kernel
  honours position_ids in a left-padded prompt only together with query_seqlens, and needs
  rotary_dim / 2 to be a multiple of 8 (probed: the error "cos_cache dimension 1 must be <=
  head_size / 2 and a multiple of 8"); other rotary sizes go through com.microsoft.RotaryEmbedding
  on q and k before the op.
- q/k norms (Qwen3): standard RMSNorm ops on q and k before the rotary; the CPU kernel does not
  honour q_norm_weight (its schema: CUDA and WebGPU only).
- Sliding window: local_window_size = the window (probed: the op keeps that many keys, the
  query's own included, which is GPTConfig.sliding_window's meaning); slot distance is position
  distance because padding is only ever on the left.
- Audit graphs: qk_output=2 returns the softmax probabilities (B, nh, T, S) as attentions.{i}.

The op writes present = past + new (the contract), or, when a runtime binds one buffer with
spare capacity as both past and present, only the new positions (runtimes/ort.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptdeploy import contract as io
from gptdeploy.config import GPTConfig
from gptdeploy.contract import GraphSignature
from gptdeploy.exporters.graph_edits import MS_DOMAIN, ensure_opset, insert_before, remove_dead_nodes

P = "/attention"  # prefix of the nodes and tensors this pass adds
ROTARY_ALIGN = 8  # the CPU kernel's rule for cos_cache's width, rotary_dim / 2


@dataclass(frozen=True)
class Site:
    """One layer's attention in the traced graph."""

    qkv: str  # the projection's output (after its bias), (B, T, (nh + 2 nkv) hs)
    c_proj: onnx.NodeProto  # the output projection, whose input[0] becomes the op's output
    q_norm: np.ndarray | None  # (hs,) RMSNorm weights (Qwen3)
    k_norm: np.ndarray | None


def attention_params(state: dict) -> dict[str, np.ndarray]:
    """The canonical tensors this pass locates the layers by (c_attn, c_proj, q/k norms)."""
    keys = ("attn.c_attn.", "attn.c_proj.weight", "attn.q_norm.weight", "attn.k_norm.weight")
    return {k: np.asarray(v) for k, v in state.items() if any(s in k for s in keys)}


def locate(proto: onnx.ModelProto, config: GPTConfig, params: dict[str, np.ndarray]) -> list[Site] | str:
    """Every layer's Site, found through the initializers that hold its weights; or what is missing."""
    from gptdeploy.exporters.weights_map import match_initializers

    refs = match_initializers(params, proto, base_dir=".")
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    # The tracer stores identical tensors once and hands the copies out through Identity nodes
    # (random-init GPT-2: every zero bias is one initializer): a reader of an Identity of an
    # initializer reads that initializer.
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(alias.get(name, name), []).append(node)
    sites = []
    for i in range(config.n_layer):
        p = f"h.{i}.attn"
        c_attn = _only_reader(readers, refs.get(f"{p}.c_attn.weight"), "MatMul")
        c_proj = _only_reader(readers, refs.get(f"{p}.c_proj.weight"), "MatMul")
        if c_attn is None or c_proj is None:
            return f"layer {i}: no single MatMul reads the c_attn / c_proj weights"
        qkv = c_attn.output[0]
        if config.qkv_bias:
            bias = refs.get(f"{p}.c_attn.bias")
            add = next((n for n in readers.get(qkv, []) if n.op_type == "Add" and bias
                        and bias.initializer in (alias.get(x, x) for x in n.input)), None)
            if add is None:
                return f"layer {i}: the c_attn bias Add was not found"
            qkv = add.output[0]
        norms = [None, None]
        if config.qk_norm:
            for j, which in enumerate(("q_norm", "k_norm")):
                ref = refs.get(f"{p}.{which}.weight")
                if ref is None:
                    return f"layer {i}: the {which} weights were not found"
                norms[j] = numpy_helper.to_array(inits[ref.initializer]).astype(np.float32)
        sites.append(Site(qkv, c_proj, *norms))
    return sites


def _only_reader(readers, ref, op_type: str) -> onnx.NodeProto | None:
    nodes = readers.get(ref.initializer, []) if ref is not None else []
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def unfusable(config: GPTConfig) -> str | None:
    """Why the op cannot compute this model's attention, from its description; or None."""
    if config.head_dim % 8:  # onnxruntime 1.32's CPU kernel: "head_size must be a multiple of 8"
        return f"head size {config.head_dim}: GroupQueryAttention's CPU kernel needs a multiple of 8"
    return None


def fuse_attention(proto: onnx.ModelProto, config: GPTConfig, sig: GraphSignature, params: dict) -> str | None:
    """Rewrite every layer's attention as GroupQueryAttention, in place; returns why not, or None.
    Changes nothing unless every layer was located."""
    why = unfusable(config)
    if why:
        return why
    sites = locate(proto, config, params)
    if isinstance(sites, str):
        return sites
    g = proto.graph
    taken = set(sig.present_names()) | ({io.attention(i) for i in range(config.n_layer)} if sig.attentions else set())
    for node in g.node:  # the old producers give their output names up to the ops made below
        node.output[:] = [f"{o}/unfused" if o in taken else o for o in node.output]
    inputs = _shared_inputs(g, config)
    rotary = "cos" in inputs and not inputs["rotary_outside"]
    for i, site in enumerate(sites):
        nodes, q, k, v = _qkv_inputs(g, config, site, i, inputs)
        cos_sin_pos = [inputs["cos"], inputs["sin"], inputs["position_ids"]] if rotary else ["", "", ""]
        names = [q, k, v, sig.past_names()[2 * i], sig.past_names()[2 * i + 1], f"{P}/seqlens_k",
                 f"{P}/total_sequence_length", *cos_sin_pos, f"{P}/attention_bias", "", "", "", "", "",
                 f"{P}/query_seqlens"]
        y = f"{P}/h.{i}/output"
        outputs = [y, sig.present_names()[2 * i], sig.present_names()[2 * i + 1]]
        if sig.attentions:
            outputs.append(io.attention(i))
        nodes.append(helper.make_node(
            "GroupQueryAttention", names, outputs, name=f"{P}/h.{i}/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=config.n_head, kv_num_heads=config.kv_heads, scale=config.attention_scale(i),
            do_rotary=int(rotary),
            local_window_size=config.sliding_window if config.windowed(i) else -1,
            **({"qk_output": 2} if sig.attentions else {}),  # after the softmax: the probabilities
        ))
        site.c_proj.input[0] = y
        insert_before(g, site.c_proj, nodes)
    ensure_opset(proto, MS_DOMAIN)
    remove_dead_nodes(g)
    return None


def _shared_inputs(g: onnx.GraphProto, config: GPTConfig) -> dict:
    """The op's inputs that every layer shares, computed once at the top of the graph:
    ::
        attention_mask (B, S) ─Shape─ [B, S] ─ total (int32), seqlens_k = total - 1 (B,)
        input_ids (B, T) ─Shape─ [B, T] ─ query_seqlens = T (B,)
        attention_mask ─ >0 ─Where(0, finfo.min)─ (B, 1, 1, S) ─Expand─ attention_bias (B, 1, T, S)
    """
    c = {name: numpy_helper.from_array(np.array(v, dtype), f"{P}/{name}") for name, v, dtype in (
        ("zero_i64", 0, np.int64), ("one_i64", 1, np.int64), ("first", [0], np.int64), ("second", [1], np.int64),
        ("one_i32", 1, np.int32), ("axes_1_2", [1, 2], np.int64), ("ones_1", [1], np.int64),
        ("allowed", 0.0, np.float32), ("masked", np.finfo(np.float32).min, np.float32))}
    g.initializer.extend(c.values())
    t = {k: f"{P}/{k}" for k in c}
    mask, ids = io.ATTENTION_MASK, io.INPUT_IDS
    nodes = [
        helper.make_node("Shape", [mask], [f"{P}/mask_shape"]),
        helper.make_node("Shape", [ids], [f"{P}/ids_shape"]),
        helper.make_node("Gather", [f"{P}/mask_shape", t["one_i64"]], [f"{P}/total_i64"], axis=0),
        helper.make_node("Cast", [f"{P}/total_i64"], [f"{P}/total_sequence_length"], to=TensorProto.INT32),
        helper.make_node("Gather", [f"{P}/mask_shape", t["first"]], [f"{P}/batch"], axis=0),  # [B]
        helper.make_node("Sub", [f"{P}/total_sequence_length", t["one_i32"]], [f"{P}/last"]),
        helper.make_node("Expand", [f"{P}/last", f"{P}/batch"], [f"{P}/seqlens_k"]),
        helper.make_node("Gather", [f"{P}/ids_shape", t["one_i64"]], [f"{P}/T_i64"], axis=0),
        helper.make_node("Cast", [f"{P}/T_i64"], [f"{P}/T_i32"], to=TensorProto.INT32),
        helper.make_node("Expand", [f"{P}/T_i32", f"{P}/batch"], [f"{P}/query_seqlens"]),
        helper.make_node("Cast", [mask], [f"{P}/mask_bool"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", [f"{P}/mask_bool", t["axes_1_2"]], [f"{P}/mask_b11s"]),
        helper.make_node("Where", [f"{P}/mask_b11s", t["allowed"], t["masked"]], [f"{P}/bias_row"]),
        helper.make_node("Gather", [f"{P}/ids_shape", t["second"]], [f"{P}/T"], axis=0),  # [T]
        helper.make_node("Gather", [f"{P}/mask_shape", t["second"]], [f"{P}/S"], axis=0),  # [S]
        helper.make_node("Concat", [f"{P}/batch", t["ones_1"], f"{P}/T", f"{P}/S"], [f"{P}/bias_shape"], axis=0),
        helper.make_node("Expand", [f"{P}/bias_row", f"{P}/bias_shape"], [f"{P}/attention_bias"]),
    ]
    shared: dict = {}
    if config.rope is not None:
        cos, sin = rotary_caches(config)
        g.initializer.extend([numpy_helper.from_array(cos, f"{P}/cos_cache"), numpy_helper.from_array(sin, f"{P}/sin_cache")])
        shared.update(cos=f"{P}/cos_cache", sin=f"{P}/sin_cache", position_ids=io.POSITION_IDS,
                      rotary_outside=(config.rotary_dim // 2) % ROTARY_ALIGN != 0)
    for j, node in enumerate(nodes):
        # No module path in these names: runtimes/torch.py reads old bundles' weights by node names.
        node.name = f"attention.shared.{node.op_type}_{j}"
        g.node.insert(j, node)
    return shared


def rotary_caches(config: GPTConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (block_size, rotary_dim / 2), fp32, by the ops modeling.GPT.forward uses, so each
    row holds the values the unfused graph computes for that position."""
    import torch

    from gptdeploy.modeling import rope_inv_freq

    inv = rope_inv_freq(config.rope, config.head_dim)  # (rd/2,)
    freqs = torch.arange(config.block_size, dtype=torch.int64)[:, None].to(torch.float32) * inv  # (block, rd/2)
    return freqs.cos().numpy(), freqs.sin().numpy()


def _qkv_inputs(g, config: GPTConfig, site: Site, i: int, shared: dict):
    """The nodes before the op and its (query, key, value) inputs: the packed qkv when nothing sits
    between projection and attention, else split q, k, v with norms / an outside rotary applied."""
    outside = shared.get("rotary_outside", False)
    if site.q_norm is None and not outside:
        return [], site.qkv, "", ""
    p = f"{P}/h.{i}"
    hs, widths = config.head_dim, [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    g.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), f"{p}/split"))
    q, k, v = f"{p}/q", f"{p}/k", f"{p}/v"
    nodes = [helper.make_node("Split", [site.qkv, f"{p}/split"], [q, k, v], name=f"{p}/Split", axis=2)]
    if site.q_norm is not None:
        for which, heads, weight in (("q", config.n_head, site.q_norm), ("k", config.kv_heads, site.k_norm)):
            normed = _rms_norm(g, nodes, f"{p}/{which}_norm", f"{p}/{which}", heads, hs, weight, config.layer_norm_eps)
            q, k = (normed, k) if which == "q" else (q, normed)
    if outside:
        for which, heads in (("q", config.n_head), ("k", config.kv_heads)):
            src, out = (q if which == "q" else k), f"{p}/{which}_rotary"
            nodes.append(helper.make_node(
                "RotaryEmbedding", [src, shared["position_ids"], shared["cos"], shared["sin"]], [out],
                name=f"{p}/{which}/RotaryEmbedding", domain=MS_DOMAIN, num_heads=heads,
                rotary_embedding_dim=config.rotary_dim, interleaved=0))
            q, k = (out, k) if which == "q" else (q, out)
    return nodes, q, k, v


def _rms_norm(g, nodes: list, p: str, x: str, heads: int, hs: int, weight: np.ndarray, eps: float) -> str:
    """Per-head RMSNorm of x (B, T, heads * hs), as modeling.Norm computes it:
    w * (x * 1 / sqrt(mean(x^2) + eps)) over each head's hs values. Returns the output name."""
    for name, value in (("heads", [0, 0, heads, hs]), ("flat", [0, 0, heads * hs])):
        g.initializer.append(numpy_helper.from_array(np.array(value, np.int64), f"{p}/{name}"))
    for name, value in (("two", 2.0), ("eps", eps), ("one", 1.0)):
        g.initializer.append(numpy_helper.from_array(np.array(value, np.float32), f"{p}/{name}"))
    g.initializer.append(numpy_helper.from_array(weight, f"{p}/weight"))
    t = [f"{p}/{s}" for s in ("x", "sq", "mean", "var", "std", "inv", "normed", "scaled", "out")]
    nodes += [
        helper.make_node("Reshape", [x, f"{p}/heads"], [t[0]], name=f"{p}/Reshape"),  # (B, T, heads, hs)
        helper.make_node("Pow", [t[0], f"{p}/two"], [t[1]], name=f"{p}/Pow"),
        helper.make_node("ReduceMean", [t[1]], [t[2]], name=f"{p}/ReduceMean", axes=[-1], keepdims=1),
        helper.make_node("Add", [t[2], f"{p}/eps"], [t[3]], name=f"{p}/Add"),
        helper.make_node("Sqrt", [t[3]], [t[4]], name=f"{p}/Sqrt"),
        helper.make_node("Div", [f"{p}/one", t[4]], [t[5]], name=f"{p}/Div"),
        helper.make_node("Mul", [t[0], t[5]], [t[6]], name=f"{p}/Mul"),
        helper.make_node("Mul", [f"{p}/weight", t[6]], [t[7]], name=f"{p}/Mul_1"),
        helper.make_node("Reshape", [t[7], f"{p}/flat"], [t[8]], name=f"{p}/Reshape_1"),  # (B, T, heads * hs)
    ]
    return t[8]


__all__ = ["Site", "attention_params", "fuse_attention", "locate", "rotary_caches", "unfusable"]
