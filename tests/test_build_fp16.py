"""FP16 graph with FP32 islands: structure and parity against the FP32 graph on ONNX Runtime CPU.

The fast tests use a small synthetic model with the image-graph contract (uint8 NHWC in, float32
scores out) and every pattern the islands target: nn.LayerNorm (-> LayerNormalization), a
decomposed LayerNorm, scale-on-Q attention (vanilla, SCLIP qq+kk, NACLIP with a bias), L2 norms,
the cosine classifier with synonym max, and CLIP-DINOiser's correlation pooling + softmax.
The slow tests run the real exporter's graphs for every head on full ViT-B/16 random weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from clipfuse.export import fp16 as fp16_pass  # noqa: E402
from clipfuse.export import graph_checks  # noqa: E402

nn = torch.nn
F = torch.nn.functional


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mode: str = "qk", decomposed_ln: bool = False,
                 grid: int = 4):
        super().__init__()
        self.heads, self.mode, self.decomposed_ln = heads, mode, decomposed_ln
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        pos = np.stack([ys.ravel(), xs.ravel()], 1).astype(np.float32)
        d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
        bias = np.zeros((grid * grid + 1,) * 2, np.float32)
        bias[1:, 1:] = np.exp(-d2 / (2 * 5.0 ** 2))
        self.register_buffer("gauss", torch.from_numpy(bias))

    def _ln(self, ln: nn.LayerNorm, x):
        if not self.decomposed_ln:
            return ln(x)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self._ln(self.ln_1, x)).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        scale = 1.0 / math.sqrt(hd)
        if self.mode == "qk":
            attn = ((q * scale) @ k.transpose(-1, -2)).softmax(-1)
        elif self.mode == "sclip":
            attn = ((q * scale) @ q.transpose(-1, -2)).softmax(-1) + ((k * scale) @ k.transpose(-1, -2)).softmax(-1)
        elif self.mode == "naclip":
            attn = ((k * scale) @ k.transpose(-1, -2) + self.gauss).softmax(-1)
        else:
            raise ValueError(self.mode)
        y = self.out((attn @ v).permute(0, 2, 1, 3).reshape(b, n, d))
        if self.mode == "naclip":
            return y
        x = x + y
        return x + self.mlp(self._ln(self.ln_2, x))


class TinySegmenter(nn.Module):
    """uint8 [B,S,S,3] -> float32 [B,K,S/16,S/16]; `head` picks the last block / classifier."""

    def __init__(self, head: str = "sclip", size: int = 64, width: int = 64, heads: int = 4,
                 embed: int = 32, synonyms=(1, 2, 1), decomposed_ln: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.head, self.grid, self.synonyms = head, size // 16, list(synonyms)
        self.register_buffer("mean", torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1) * 255)
        self.conv = nn.Conv2d(3, width, 16, 16, bias=False)
        self.cls = nn.Parameter(torch.randn(width) * 0.5)
        self.pos = nn.Parameter(torch.randn(self.grid ** 2 + 1, width) * 0.5)
        self.ln_pre = nn.LayerNorm(width)
        last = {"sclip": "sclip", "naclip": "naclip"}.get(head, "qk")
        self.blocks = nn.ModuleList([_Block(width, heads, "qk", decomposed_ln, self.grid),
                                     _Block(width, heads, last, decomposed_ln, self.grid)])
        # CLIP activations are large (residual stream norms in the tens): scale to exercise FP16
        with torch.no_grad():
            for blk in self.blocks:
                blk.mlp[2].weight.mul_(8.0)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed) / math.sqrt(width))
        text = F.normalize(torch.randn(sum(self.synonyms), embed), dim=-1)
        self.register_buffer("text", text)
        self.obj_proj = nn.Conv2d(width, 16, 3, padding=1, padding_mode="replicate")

    def forward(self, image):
        x = image.float().permute(0, 3, 1, 2)  # Cast first: TensorRT-legal uint8 input
        x = (x - self.mean) / self.std
        x = self.conv(x)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.view(1, 1, d).expand(b, 1, d), x], 1) + self.pos
        x = self.ln_pre(x)
        for blk in self.blocks:
            x = blk(x)
        feats = self.ln_post(x[:, 1:]) @ self.proj                      # [B, N, E]
        if self.head == "clip-dinoiser":
            g = x[:, 1:].transpose(1, 2).reshape(b, d, h, w)
            p = F.normalize(self.obj_proj(g), dim=1).flatten(2)          # [B, 16, N]
            corr = p.transpose(1, 2) @ p                                  # [B, N, N]
            corr = torch.where(corr < 0.2, torch.zeros_like(corr), corr)
            feats = (corr @ feats) / (corr.sum(-1, keepdim=True) + 1e-6)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = feats @ self.text.t()                                   # [B, N, sum(syn)]
        per_class, start = [], 0
        for n in self.synonyms:
            per_class.append(logits[..., start:start + n].amax(-1, keepdim=True))
            start += n
        scores = torch.cat(per_class, -1)
        if self.head == "clip-dinoiser":
            scores = (100.0 * scores).softmax(-1)
        return scores.transpose(1, 2).reshape(b, len(self.synonyms), h, w)


def export_tiny(path: Path, head: str = "sclip", size: int = 64, decomposed_ln: bool = False) -> Path:
    model = TinySegmenter(head=head, size=size, decomposed_ln=decomposed_ln).eval()
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def run_ort(path, image: np.ndarray, basic_opt: bool = False) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if basic_opt:
        # ORT's LayerNormFusion mis-types a decomposed LayerNorm whose input arrives through a
        # Cast (FP16 residual -> FP32 island): "Type parameter (T) ... bound to different types".
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": image})[0]


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def parity(fp32: np.ndarray, fp16: np.ndarray) -> "tuple[float, float]":
    """(max |diff|, argmax agreement over classes)."""
    assert fp16.dtype == np.float32 and np.isfinite(fp16).all()
    diff = float(np.abs(fp32.astype(np.float64) - fp16).max())
    agree = float((fp32.argmax(1) == fp16.argmax(1)).mean())
    return diff, agree


def _node_types(model, op: str):
    return [n for n in model.graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for head in ("sclip", "naclip", "clip-dinoiser"):
        out[head] = export_tiny(root / f"{head}.onnx", head)
    out["decomposed"] = export_tiny(root / "decomposed.onnx", "sclip", decomposed_ln=True)
    return out


@pytest.mark.parametrize("name", ["sclip", "naclip", "clip-dinoiser", "decomposed"])
def test_fp16_graph_matches_fp32_on_ort_cpu(tiny_graphs, tmp_path, name):
    src = tiny_graphs[name]
    dst = tmp_path / "m.fp16.onnx"
    report = fp16_pass.convert_file(src, dst)
    model = onnx.load(str(dst))
    # I/O dtypes unchanged
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # most weights really are FP16 and the graph passes the build checks
    n16 = sum(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    assert n16 >= 10 and report.casts_inserted > 0
    assert graph_checks.run_checks(model) == []
    images = random_images(4, 64, seed=1)
    basic = name == "decomposed"
    diff, agree = parity(run_ort(src, images, basic), run_ort(dst, images, basic))
    assert diff <= 1e-2, diff
    assert agree >= 0.99, agree


def _tensor_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def test_islands_are_fp32_and_bulk_is_fp16(tiny_graphs, tmp_path):
    model, _ = fp16_pass.convert_to_fp16(onnx.load(str(tiny_graphs["clip-dinoiser"])))
    types = _tensor_types(model)
    # every LayerNorm, Softmax and reduction reads FP32
    for op in ("LayerNormalization", "Softmax", "ReduceL2", "ReduceSum", "ReduceMax"):
        nodes = _node_types(model, op)
        assert nodes, op
        for node in nodes:
            assert types[node.input[0]] == TensorProto.FLOAT, (op, node.name)
    # the attention/MLP MatMuls are FP16; the classifier and the pooling MatMul are FP32
    matmul_types = [types[n.input[0]] for n in _node_types(model, "MatMul")]
    assert matmul_types.count(TensorProto.FLOAT16) >= 6
    assert matmul_types.count(TensorProto.FLOAT) >= 2
    conv = _node_types(model, "Conv")
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in conv[:1])


def test_decomposed_layernorm_statistics_stay_fp32(tiny_graphs):
    model, report = fp16_pass.convert_to_fp16(onnx.load(str(tiny_graphs["decomposed"])))
    types = _tensor_types(model)
    for op in ("ReduceMean", "Pow", "Sqrt"):
        for node in _node_types(model, op):
            assert types[node.input[0]] == TensorProto.FLOAT, (op, node.name)
    assert report.fp32_by_reason.get("statistic", 0) >= 6


# --- every head, full ViT-B/16 (random weights), exporter graphs ---------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("head", ["maskclip", "sclip", "clearclip", "naclip", "clip-dinoiser"])
def test_fp16_vitb16_every_head(tmp_path, head, vitb16_graph):
    """Measured (4 random 224x224 images, ORT CPU): max |diff| of cosine scores ~1.1e-4 (maskclip,
    sclip), ~1.3e-4 (clearclip, naclip); argmax agreement 100%. CLIP-DINOiser probabilities (softmax
    of 100 x cosine) do NOT meet 1e-2 everywhere: median ~6e-5, but 0.6-1.1% of values are off by
    0.01-0.06: its pooling zeroes affinities < 0.2 (a hard threshold), and rounding the weights to
    FP16 alone (FP32 activations) flips ~0.07% of them and gives the same max, so no FP32 island
    can remove it. Asserted: <= 2% of values off by > 1e-2, max <= 0.1, argmax agreement >= 99%."""
    src = vitb16_graph(head)
    dst = tmp_path / f"{head}.fp16.onnx"
    fp16_pass.convert_file(src, dst)
    assert graph_checks.run_checks(onnx.load(str(dst))) == []
    images = random_images(4, 224, seed=3)
    ref, got = run_ort(src, images), run_ort(dst, images)
    diff, agree = parity(ref, got)
    assert agree >= 0.99, agree
    print(f"\n{head}: FP16 vs FP32 max|diff| {diff:.2e}, argmax agreement {agree:.4f}")
    if head == "clip-dinoiser":
        over = float((np.abs(ref - got) > 1e-2).mean())
        print(f"{head}: fraction of probabilities off by > 1e-2: {over:.4f}")
        assert over <= 0.02 and diff <= 0.1, (over, diff)
        assert np.all((got >= 0) & (got <= 1 + 1e-6))
    else:
        assert diff <= 1e-2, diff
