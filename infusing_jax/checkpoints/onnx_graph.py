"""The image tower as an ONNX graph (opset 17), for serving stacks outside JAX.

    model = onnx_graph.image_tower(flat, cfg)   # onnx.ModelProto
    onnx_graph.write(model, "model.onnx")

The graph is models/vit.py's forward pass, written op by op from the canonical
flat parameters (float32):

  images (N, S, S, 3) -> patch Conv -> [cls] + position embedding -> [pre_norm]
  (TIPS: its position grid resized to S's patch grid here; two cls tokens)
  -> depth x (x + MHA(LN(x)); x + MLP(LN(x))) -> encoder_norm
  -> pool (MAP head | token 0 | mean) -> [head]  = features (N, E)
  embedding = features / (||features|| + 1e-8)  (as `TwoTowers` normalises)

N is a dynamic axis; S is the model's `image_size`. Pixels are expected as the
eval view makes them (the family's normalisation already applied). Each
attention is softmax(q k^T / sqrt(d)) v per head on (N, H, L, d) tensors.
"""
import os

import jax
import numpy as np

from infusing_jax import errors
from infusing_jax.models import config as model_config_lib
from infusing_jax.models import transformer

OPSET = 17
# A protobuf message holds at most 2 GiB; bigger models keep their weights beside it.
PROTOBUF_LIMIT = 2 ** 31 - 2 ** 20


def _onnx():
    try:
        import onnx
    except ImportError:
        raise errors.UserError("ONNX export needs the onnx package: pip install "
                               "'infusing_jax[onnx]' (or pip install onnx)") from None
    return onnx


class _Graph:
    """Nodes and initialisers under construction; each method returns its output's name."""

    def __init__(self, onnx, flat):
        self.onnx, self.flat = onnx, flat
        self.nodes, self.inits, self._count = [], [], 0

    def const(self, value, name=None) -> str:
        name = name or self._fresh("const")
        array = np.asarray(value)
        array = array.astype(np.int64 if array.dtype.kind in "iu" else np.float32)
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def param(self, key, transform=lambda a: a) -> str:
        return self.const(transform(np.asarray(self.flat[key], np.float32)), key)

    def op(self, kind, *inputs, out=None, **attrs) -> str:
        out = out or self._fresh(kind.lower())
        self.nodes.append(self.onnx.helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def _fresh(self, stem) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def dense(self, x, prefix, bias=True, inputs=1) -> str:
        """x (..., in) @ kernel (in, out) + bias. DenseGeneral kernels are flattened: the
        first `inputs` axes to `in`, the rest to `out` (query (W, H, d): 1; out (H, d, W): 2)."""
        flatten = lambda a: a.reshape(int(np.prod(a.shape[:inputs])), -1)
        y = self.op("MatMul", x, self.param(f"{prefix}/kernel", flatten))
        if not bias:
            return y
        return self.op("Add", y, self.param(f"{prefix}/bias", lambda a: a.reshape(-1)))

    def layer_norm(self, x, prefix, eps) -> str:
        return self.op("LayerNormalization", x, self.param(f"{prefix}/scale"),
                       self.param(f"{prefix}/bias"), axis=-1, epsilon=float(eps))

    def activation(self, x, act) -> str:
        if act == "quick_gelu":  # x sigmoid(1.702 x)
            return self.op("Mul", x, self.op("Sigmoid", self.op("Mul", x, self.const(1.702))))
        if act == "gelu":  # x/2 (1 + erf(x / sqrt 2))
            inner = self.op("Erf", self.op("Mul", x, self.const(1 / np.sqrt(2.0))))
        elif act == "gelu_tanh":  # x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cube = self.op("Mul", self.op("Mul", x, x), x)
            poly = self.op("Add", x, self.op("Mul", cube, self.const(0.044715)))
            inner = self.op("Tanh", self.op("Mul", poly, self.const(np.sqrt(2 / np.pi))))
        else:
            raise errors.UserError(f"ONNX export: activation {act!r} is not supported")
        half = self.op("Mul", x, self.const(0.5))
        return self.op("Mul", half, self.op("Add", inner, self.const(1.0)))

    def mlp(self, x, prefix, act) -> str:
        if act == transformer.SWIGLU:  # silu(x W0 + b0) * (x W1 + b1) -> Dense_2
            gate = self.dense(x, f"{prefix}/Dense_0")
            gate = self.op("Mul", gate, self.op("Sigmoid", gate))
            value = self.dense(x, f"{prefix}/Dense_1")
            return self.dense(self.op("Mul", gate, value), f"{prefix}/Dense_2")
        return self.dense(self.activation(self.dense(x, f"{prefix}/Dense_0"), act),
                          f"{prefix}/Dense_1")

    def attention(self, q_in, kv_in, prefix, heads) -> str:
        """flax MultiHeadDotProductAttention: (N, Lq, W), (N, Lk, W) -> (N, Lq, W)."""
        width = self.flat[f"{prefix}/query/kernel"].shape[0]
        d = width // heads
        split = self.const([0, 0, heads, d])

        def project(x, name, perm):
            y = self.op("Reshape", self.dense(x, f"{prefix}/{name}"), split)
            return self.op("Transpose", y, perm=perm)

        q = project(q_in, "query", [0, 2, 1, 3])  # (N, H, Lq, d)
        k = project(kv_in, "key", [0, 2, 3, 1])  # (N, H, d, Lk)
        v = project(kv_in, "value", [0, 2, 1, 3])  # (N, H, Lk, d)
        q = self.op("Mul", q, self.const(1 / np.sqrt(d)))
        weights = self.op("Softmax", self.op("MatMul", q, k), axis=-1)
        out = self.op("Transpose", self.op("MatMul", weights, v), perm=[0, 2, 1, 3])
        out = self.op("Reshape", out, self.const([0, 0, heads * d]))
        return self.dense(out, f"{prefix}/out", inputs=2)

    def batch_of(self, x, key) -> str:
        """The (1, T, W) parameter `key` repeated along x's batch axis -> (N, T, W)."""
        n = self.op("Slice", self.op("Shape", x), self.const([0]), self.const([1]))
        shape = self.op("Concat", n, self.const(self.flat[key].shape[1:]), axis=0)
        return self.op("Expand", self.param(key), shape)


def image_tower(flat: dict, cfg):
    """Canonical flat params ('img/...' keys; scan unrolled) of a model config ->
    onnx.ModelProto with input 'images' (N, S, S, 3) and outputs 'embedding' and
    'features' (N, E), float32."""
    onnx = _onnx()
    arch = model_config_lib.resolved_towers(cfg)[0]
    g = _Graph(onnx, flat)
    size, p = cfg.image_size, arch["patch_size"]
    grid = size // p
    width, heads, eps = arch["width"], arch["num_heads"], arch["ln_eps"]

    nchw = g.op("Transpose", "images", perm=[0, 3, 1, 2])
    conv_in = [nchw, g.param("img/embedding/kernel", lambda a: a.transpose(3, 2, 0, 1))]
    if arch["patch_bias"]:
        conv_in.append(g.param("img/embedding/bias"))
    x = g.op("Conv", *conv_in, kernel_shape=[p, p], strides=[p, p])
    x = g.op("Transpose", g.op("Reshape", x, g.const([0, width, -1])), perm=[0, 2, 1])

    has_cls = arch["pool_type"] == "tok"
    cls = None
    if has_cls:
        cls = g.batch_of(x, "img/cls")
    if has_cls and arch["cls_posemb"]:
        x = g.op("Concat", cls, x, axis=1)
    if arch["posemb"] == "learn":
        posemb = g.param("img/pos_embedding")
    elif arch["posemb"] == "learn_2d":  # resized to the patch grid once, here
        table = np.asarray(flat["img/pos_embedding"], np.float32)
        if table.shape[1] != grid:
            table = np.asarray(jax.image.resize(table, (1, grid, grid, width), "bilinear"))
        posemb = g.const(table.reshape(1, grid * grid, width), "img/pos_embedding")
    else:
        posemb = g.const(np.asarray(transformer.posemb_sincos_2d(grid, grid, width)))
    x = g.op("Add", x, posemb)
    if has_cls and not arch["cls_posemb"]:
        x = g.op("Concat", cls, x, axis=1)
    if arch["pre_norm"]:
        x = g.layer_norm(x, "img/pre_norm", eps)

    for i in range(arch["depth"]):
        block = f"img/Transformer/encoderblock_{i}"
        y = g.layer_norm(x, f"{block}/LayerNorm_0", eps)
        x = g.op("Add", x, g.attention(y, y, f"{block}/MultiHeadDotProductAttention_0", heads))
        y = g.layer_norm(x, f"{block}/LayerNorm_1", eps)
        x = g.op("Add", x, g.mlp(y, f"{block}/MlpBlock_0", arch["act"]))
    x = g.layer_norm(x, "img/Transformer/encoder_norm", eps)

    if arch["pool_type"] == "map":
        probe = g.batch_of(x, "img/MAPHead_0/probe")
        x = g.attention(probe, x, "img/MAPHead_0/MultiHeadDotProductAttention_0", heads)
        y = g.layer_norm(x, "img/MAPHead_0/LayerNorm_0", eps)
        x = g.op("Add", x, g.mlp(y, "img/MAPHead_0/MlpBlock_0", arch["act"]))
        x = g.op("Squeeze", x, g.const([1]))
    elif arch["pool_type"] == "tok":
        x = g.op("Gather", x, g.const(0), axis=1)
    else:
        x = g.op("ReduceMean", x, axes=[1], keepdims=0)
    if arch["out_dim"]:
        x = g.dense(x, "img/head", bias=arch["head_bias"])
    features = g.op("Identity", x, out="features")
    norm = g.op("Add", g.op("ReduceL2", features, axes=[-1], keepdims=1), g.const(1e-8))
    g.op("Div", features, norm, out="embedding")

    out_dim = arch["out_dim"] or width
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        g.nodes, f"{cfg.family}_image_tower",
        [tensor("images", onnx.TensorProto.FLOAT, ["batch", size, size, 3])],
        [tensor("embedding", onnx.TensorProto.FLOAT, ["batch", out_dim]),
         tensor("features", onnx.TensorProto.FLOAT, ["batch", out_dim])],
        g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="infusing_jax")
    model.doc_string = (f"{cfg.family} image tower, {size} px: images (batch, {size}, {size}, "
                        "3) float32 in the family's eval normalisation -> embedding "
                        "(L2-normalised) and features")
    return model


def weight_bytes(model) -> int:
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def write(model, path: str, limit: int = PROTOBUF_LIMIT) -> list:
    """Write to a local `path`; past `limit` bytes of weights, they go to `path`.data
    beside it (ONNX external data). -> the files written."""
    onnx = _onnx()
    sidecar = path + ".data"
    if os.path.exists(sidecar):
        os.remove(sidecar)  # external data is appended to: never to a stale file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if weight_bytes(model) <= limit:
        onnx.save_model(model, path)
        return [path]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving moves the tensors out of the model it is given
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(sidecar), size_threshold=1024)
    return [path, sidecar]
