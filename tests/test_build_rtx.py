"""Real TensorRT in CI: TensorRT for RTX parses and builds, STRONGLY TYPED and ahead of time on this
CPU, an engine of every graph family clipfuse exports (6 heads x FP32/FP16, dynamic vocabulary,
frame graphs with baked and dynamic vocabulary, text encoder, refer global/local), and each engine's I/O tensors (names, dtypes, shapes, batch
profile) match the manifest's contract. Tiny ViT (the op set is the point; build time is not);
ViT-B/16 once per head family in the slow tests. Engine EXECUTION needs a GPU: those tests are in
test_build_engine.py and skip without one.
"""
from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("polygraphy", reason="polygraphy is not installed (dev extra): no engine builds")
try:
    import tensorrt_rtx  # noqa: F401
except Exception as exc:  # pragma: no cover - the dev extra installs it
    pytest.skip(f"tensorrt_rtx does not import ({type(exc).__name__}: {exc}); install tensorrt-rtx-cu13",
                allow_module_level=True)

from clipfuse.export.build import BuildOptions, build  # noqa: E402
from clipfuse.export.trt_build import BatchProfile  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.fileio import sha256_file  # noqa: E402
from clipfuse.runtime.manifest import manifest_path_for, read_manifest  # noqa: E402
from conftest import TINY_HEAD_PARAMS  # noqa: E402

from clipfuse.runtime.methods import METHODS  # noqa: E402

HEADS = tuple(METHODS)
VOCAB = [["background"], ["cat", "kitty"], ["grass"]]
# one target keeps CI builds short; the default (all RTX targets) is checked once below
ONE_TARGET = ("86",)
FRAME = (240, 320)  # H, W of the frame graphs (2 x 2 windows at the tiny ViT's 224)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_clip):
    """Every graph family, exported once from the tiny ViT: name -> FP32 .onnx path."""
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.export.refer_export import export_refer

    out = tmp_path_factory.mktemp("rtx")
    paths = {}
    for head in HEADS:
        paths[head] = export_image_graph(ImageExportSpec(head, model="ViT-T-16-test", pretrained="none",
                                                         classes=VOCAB, size=224, templates="single",
                                                         head_params=TINY_HEAD_PARAMS.get(head, {})),
                                         out / head, clip=tiny_clip)
    paths["sclip-dynamic"] = export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                                                                classes=VOCAB, size=224, templates="single",
                                                                vocab_mode="dynamic"),
                                                out / "sclip-dyn", clip=tiny_clip)
    for name, vocab_mode in (("sclip-frame", "baked"), ("sclip-frame-dynamic", "dynamic")):
        paths[name] = export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                                                         classes=VOCAB, templates="single", vocab_mode=vocab_mode,
                                                         frame=FRAME),
                                         out / name, clip=tiny_clip)
    refer = export_refer(out / "refer", model="ViT-T-16-test", pretrained="none", seed=0)
    paths.update({f"refer-{part}": p for part, p in refer.items()})  # global, local, text (the text encoder)
    return paths


def _build(path: Path, precision: str, **kw):
    options = BuildOptions(precision=precision, trt="rtx", batch=BatchProfile(1, 2, 4),
                           classes=BatchProfile(1, 4, 8), workspace_bytes=1 << 30, targets=kw.pop("targets", ONE_TARGET),
                           **kw)
    return build(path, read_manifest(manifest_path_for(path)), options, log=lambda msg: None)


def _assert_engine_matches_contract(result, source_manifest: dict, precision: str) -> None:
    engine = result.engine
    assert engine.is_file() and engine.stat().st_size > 0
    manifest = read_manifest(manifest_path_for(engine))
    section = manifest["engine"]
    assert section["flavour"] == "rtx" and section["tensorrt_version"] == tensorrt_rtx.__version__
    assert section["strongly_typed"] is True and section["precision"] == precision
    assert section["sha256"] == sha256_file(engine)
    assert section["batch_profile"] == [1, 2, 4] and section["targets"] == list(result.targets)
    if precision == "fp16":
        assert section["onnx_sha256"] == sha256_file(result.fp16_onnx)
    else:
        assert section["onnx_sha256"] == source_manifest["onnx_sha256"]
    # the name carries flavour, version, targets, precision, profile and ONNX hash
    short = ".".join(tensorrt_rtx.__version__.split(".")[:2])
    assert engine.name.endswith(f".rtx{short}-sm{'_'.join(result.targets)}-{precision}-b1_2_4-"
                                f"{section['onnx_sha256'][:8]}.engine")
    # I/O of the network TensorRT built, independently compared with the exporter's contract
    io = section["io"]
    for kind in ("inputs", "outputs"):
        want = source_manifest[kind]
        assert [t["name"] for t in io[kind]] == [t["name"] for t in want]
        for got, spec in zip(io[kind], want):
            assert got["dtype"] == spec["dtype"], (got, spec)  # uint8 in, float32 out: FP16 stays inside
            assert len(got["shape"]) == len(spec["shape"])
            for axis, (g, s) in enumerate(zip(got["shape"], spec["shape"])):
                assert g == (-1 if isinstance(s, str) else s), (got["name"], axis, g, s)
    for got, spec in zip(io["inputs"], source_manifest["inputs"]):
        lo, opt, hi = got["profile"]
        for axis, s in enumerate(spec["shape"]):
            if not isinstance(s, str):
                assert lo[axis] == opt[axis] == hi[axis] == s
            elif got["name"] == "class_embeddings" or (got["name"] == "class_rows" and axis == 0):
                assert (lo[axis], opt[axis], hi[axis]) == (1, 4, 8)
            elif got["name"] == "class_rows":
                assert (lo[axis], opt[axis], hi[axis]) == (1, 1, 8)    # names per class
            else:
                assert (lo[axis], opt[axis], hi[axis]) == (1, 2, 4)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("family", HEADS + ("sclip-dynamic", "sclip-frame", "sclip-frame-dynamic"))
def test_rtx_builds_every_image_graph(graphs, family, precision):
    path = graphs[family]
    result = _build(path, precision)
    assert result.built
    _assert_engine_matches_contract(result, read_manifest(manifest_path_for(path)), precision)


@pytest.mark.parametrize("family", ["refer-global", "refer-local", "refer-text"])
def test_rtx_builds_refer_and_text_graphs(graphs, family):
    path = graphs[family]
    result = _build(path, "fp32")
    _assert_engine_matches_contract(result, read_manifest(manifest_path_for(path)), "fp32")


def test_rtx_default_targets_are_every_supported_compute_capability(graphs):
    from clipfuse.runtime import trt_support

    result = _build(graphs["naclip"], "fp16", targets=())
    expected = [t for t in trt_support.rtx_targets(tensorrt_rtx) if t not in trt_support.RTX_DEFAULT_EXCLUDED]
    assert list(result.targets) == expected and "86" in expected and "90" not in expected
    assert f"-sm{'_'.join(expected)}-fp16-" in result.engine.name


def test_old_uint8_layout_is_what_tensorrt_rejects_and_the_check_catches(tmp_path):
    """The graph check's rule is TensorRT's: a UInt8 input into a Transpose fails the real parser."""
    from onnx import TensorProto, helper

    from clipfuse.export import graph_checks, trt_build

    img = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 8, 8, 3])
    out = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    profiles = {"image": ([1, 8, 8, 3], [1, 8, 8, 3], [2, 8, 8, 3])}
    for cast_first in (False, True):
        if cast_first:
            nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                     helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2], name="nchw")]
        else:
            nodes = [helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2], name="nchw"),
                     helper.make_node("Cast", ["t"], ["x"], to=TensorProto.FLOAT)]
        model = helper.make_model(helper.make_graph(nodes, "g", [img], [out]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        path = tmp_path / f"u8-{cast_first}.onnx"
        onnx.save(model, str(path))
        flagged = graph_checks.uint8_only_into_cast(model)
        kwargs = dict(profiles=profiles, strongly_typed=True, weak_fp16=False, workspace_bytes=1 << 28,
                      opt_level=0, targets=ONE_TARGET, timing_cache=None)
        if cast_first:
            assert not flagged
            engine, io = trt_build.build_engine_bytes("rtx", path, **kwargs)
            assert len(engine) > 0 and io["inputs"][0]["dtype"] == "uint8"
        else:
            assert flagged
            with pytest.raises(ClipfuseError, match="could not parse u8-False.onnx.*UInt8"):
                trt_build.build_engine_bytes("rtx", path, **kwargs)


def test_engine_io_contract_check_refuses_a_mismatch():
    from clipfuse.runtime.trt_support import check_io_contract

    manifest = {"inputs": [{"name": "image", "dtype": "uint8", "shape": ["batch", 224, 224, 3]}],
                "outputs": [{"name": "scores", "dtype": "float32", "shape": ["batch", 3, 14, 14]}]}
    good = {"inputs": [{"name": "image", "dtype": "uint8", "shape": [-1, 224, 224, 3],
                        "profile": [[1, 224, 224, 3], [2, 224, 224, 3], [4, 224, 224, 3]]}],
            "outputs": [{"name": "scores", "dtype": "float32", "shape": [-1, 3, 14, 14]}]}
    check_io_contract(good, manifest, "m.engine")
    bad_dtype = {**good, "outputs": [{"name": "scores", "dtype": "float16", "shape": [-1, 3, 14, 14]}]}
    with pytest.raises(ClipfuseError, match="scores dtype float16 != manifest float32"):
        check_io_contract(bad_dtype, manifest, "m.engine")
    fixed_batch = {**good, "inputs": [dict(good["inputs"][0], shape=[4, 224, 224, 3])]}
    with pytest.raises(ClipfuseError, match="must stay dynamic"):
        check_io_contract(fixed_batch, manifest, "m.engine")


def test_cli_build_rtx_and_polygraphy_flavour_stays_consistent(graphs, capsys):
    """`clipfuse build --trt rtx` through the CLI; Polygraphy now drives tensorrt_rtx in this
    process, and asking it for the other flavour is one clear line, not a mixed-up build."""
    from polygraphy import config as pg_config

    from clipfuse.runtime import trt_support
    from clipfuse.runtime.cli import main as cli_main

    assert cli_main(["build", str(graphs["clearclip"]), "--trt", "rtx", "--precision", "fp32", "--batch", "1:1:2",
                     "--target-sm", "89"]) == 0
    out = capsys.readouterr().out
    assert "clearclip.rtx" in out and "-sm89-fp32-b1_1_2-" in out and "POLYGRAPHY_USE_TENSORRT_RTX=1" in out
    assert pg_config.USE_TENSORRT_RTX is True
    with pytest.raises(ClipfuseError, match="already drives TensorRT flavour 'rtx'"):
        trt_support.polygraphy_trt("tensorrt")


@pytest.mark.slow
@pytest.mark.parametrize("head", ["naclip", "clip-dinoiser", "rcs"])
def test_rtx_builds_full_vitb16_fp16_per_head_family(head, vitb16_graph, tmp_path):
    """Full size once per head family (self-correlation heads share one block; CLIP-DINOiser adds
    its pooling and background head): the folded ViT-B/16 FP16 graph parses and builds."""
    path = vitb16_graph(head)
    manifest = read_manifest(manifest_path_for(path))
    assert manifest["folding"]["nodes_after"] < manifest["folding"]["nodes_before"] // 3
    result = _build(path, "fp16")
    _assert_engine_matches_contract(result, manifest, "fp16")
