"""Engine naming, trtexec line, manifests and `clipfuse build --dry-run` (no TensorRT needed);
TensorRT build/load tests that run only where tensorrt and a CUDA GPU are present."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from clipfuse.runtime.cli import main as cli_main
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.manifest import read_manifest

onnx = pytest.importorskip("onnx")
from clipfuse.export import trt_build  # noqa: E402
from clipfuse.export.trt_build import BatchProfile, InputShape  # noqa: E402


def test_batch_profile_parsing():
    assert BatchProfile.parse("1:4:16") == BatchProfile(1, 4, 16)
    assert BatchProfile.parse("2:2:2").tag() == "b2_2_2"
    for bad in ("1:4", "4:1:16", "0:1:2", "a:b:c", "1:8:4"):
        with pytest.raises(ClipfuseError):
            BatchProfile.parse(bad)


def test_engine_name_encodes_everything_it_is_tied_to():
    name = trt_build.engine_file_name("sclip", "tensorrt", "10.3.0.30", ["8.7"], "fp16", BatchProfile(1, 4, 16),
                                      "ab" * 32)
    assert name == "sclip.trt10.3-sm87-fp16-b1_4_16-abababab.engine"
    assert trt_build.engine_file_name("x", "tensorrt", "11.4", ["sm_90"], "fp32", BatchProfile(1, 8, 32),
                                      "0" * 64) == "x.trt11.4-sm90-fp32-b1_8_32-00000000.engine"
    # TensorRT for RTX: its own prefix and every compute-capability target
    assert trt_build.engine_file_name("x", "rtx", "1.7.1.116", ["80", "86", "120"], "fp16", BatchProfile(1, 4, 16),
                                      "1" * 64) == "x.rtx1.7-sm80_86_120-fp16-b1_4_16-11111111.engine"
    with pytest.raises(ClipfuseError):
        trt_build.engine_file_name("x", "tensorrt", "ten", ["87"], "fp16", BatchProfile(1, 1, 1), "0" * 64)
    with pytest.raises(ClipfuseError, match="unknown TensorRT flavour"):
        trt_build.engine_file_name("x", "trt", "10.3", ["87"], "fp16", BatchProfile(1, 1, 1), "0" * 64)
    assert trt_build.timing_cache_name("10.3.0", "87") == "timing.trt10.3-sm87.cache"


def test_polygraphy_line_for_rtx_names_targets_and_profile():
    profiles = {"image": ([1, 224, 224, 3], [4, 224, 224, 3], [16, 224, 224, 3])}
    line = trt_build.polygraphy_command("e/m.fp16.onnx", "e/m.engine", profiles, ["86", "120"], 1 << 30, 3)
    assert line.startswith("POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy convert")
    args = shlex.split(line.split(" ", 1)[1])
    assert "--strongly-typed" in args and args[args.index("--compute-capabilities") + 1:][:2] == ["8.6", "12.0"]
    assert args[args.index("--trt-max-shapes") + 1] == "image:[16,224,224,3]"


def test_trtexec_line_profiles_only_the_batch_axis():
    inputs = [InputShape("image", (None, 448, 448, 3))]
    profiles = trt_build.input_profiles(inputs, BatchProfile(1, 4, 16), BatchProfile(1, 32, 256))
    assert profiles["image"] == ([1, 448, 448, 3], [4, 448, 448, 3], [16, 448, 448, 3])
    line = trt_build.trtexec_command("e/m.fp16.onnx", "e/m.engine", profiles, "e/t.cache", 3 << 30, 4)
    args = shlex.split(line)
    assert args[0] == "trtexec" and "--stronglyTyped" in args and "--fp16" not in args
    assert "--minShapes=image:1x448x448x3" in args and "--optShapes=image:4x448x448x3" in args
    assert "--maxShapes=image:16x448x448x3" in args and "--timingCacheFile=e/t.cache" in args
    assert "--memPoolSize=workspace:3072M" in args and "--builderOptimizationLevel=4" in args
    assert not any(a.startswith("--shapes") for a in args)
    weak = shlex.split(trt_build.trtexec_command("m.onnx", "m.engine", profiles, "t", 1 << 30, 3,
                                                 strongly_typed=False, weak_fp16=True))
    assert "--fp16" in weak and "--stronglyTyped" not in weak
    # dynamic vocabulary: class_embeddings [K, E] gets the class profile on its axis 0
    dyn = trt_build.input_profiles(inputs + [InputShape("class_embeddings", (None, 512))],
                                   BatchProfile(1, 4, 16), BatchProfile(1, 32, 256))
    assert dyn["class_embeddings"] == ([1, 512], [32, 512], [256, 512])
    with pytest.raises(ClipfuseError):
        trt_build.input_profiles([InputShape("image", (None, None, 224, 3))], BatchProfile(1, 1, 1), BatchProfile(1, 1, 1))


def test_engine_manifest_section(tmp_path):
    from clipfuse.export.build import engine_section

    section = engine_section(engine=tmp_path / "m.trt10.3-sm87-fp16-b1_4_16-12345678.engine", engine_sha256="e" * 64,
                             flavour="tensorrt", version="10.3.0.30", targets=["8.7"], gpu_name="Orin",
                             precision="fp16", batch=BatchProfile(1, 4, 16), onnx_sha256="1" * 64,
                             command="trtexec ...", workspace_bytes=1 << 30, opt_level=3,
                             timing_cache=tmp_path / "timing.cache")
    assert set(section) >= {"file", "sha256", "flavour", "tensorrt_version", "targets", "gpu_name", "precision",
                            "batch_profile", "onnx_sha256", "command", "workspace_bytes", "opt_level",
                            "timing_cache", "strongly_typed", "io"}
    assert section["targets"] == ["87"] and section["batch_profile"] == [1, 4, 16]
    assert section["file"].endswith(".engine") and section["timing_cache"] == "timing.cache"


def test_backend_refuses_engine_of_another_flavour_release_or_gpu(tmp_path):
    from clipfuse.runtime.backends.tensorrt import check_engine_target

    manifest = {"engine": {"flavour": "tensorrt", "tensorrt_version": "10.3.0.30", "targets": ["87"],
                           "gpu_name": "Orin"}}
    eng = tmp_path / "m.engine"
    check_engine_target(manifest, "tensorrt", "10.3.0.26", "87", eng)  # same release, same SM: fine
    with pytest.raises(ClipfuseError, match="TensorRT 10.3.0.30, this machine has 10.13"):
        check_engine_target(manifest, "tensorrt", "10.13.0.35", "87", eng)
    with pytest.raises(ClipfuseError, match="SM 87 .*SM 90"):
        check_engine_target(manifest, "tensorrt", "10.3.0.30", "90", eng)
    with pytest.raises(ClipfuseError, match="built by TensorRT, this backend runs TensorRT for RTX"):
        check_engine_target(manifest, "rtx", "10.3.0.30", "87", eng)
    with pytest.raises(ClipfuseError, match="no 'engine' section"):
        check_engine_target({}, "tensorrt", "10.3", "87", eng)
    # an RTX engine runs on any of its targets, and nowhere else (Hopper is not an RTX target)
    rtx = {"engine": {"flavour": "rtx", "tensorrt_version": "1.7.1.116", "targets": ["80", "86", "89"]}}
    check_engine_target(rtx, "rtx", "1.7.0", "86", eng)
    with pytest.raises(ClipfuseError, match=r"TensorRT for RTX engines do not run on this GPU, SM 90 \(Hopper"):
        check_engine_target(rtx, "rtx", "1.7.1", "90", eng)
    with pytest.raises(ClipfuseError, match="SM 80, 86, 89 .*SM 120"):
        check_engine_target(rtx, "rtx", "1.7.1", "120", eng)
    # manifests written before flavours existed are enterprise TensorRT with one "sm"
    check_engine_target({"engine": {"tensorrt_version": "10.3", "sm": "87"}}, "tensorrt", "10.3", "87", eng)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    api = pytest.importorskip("clipfuse.export.api")
    out = tmp_path_factory.mktemp("eng") / "sclip"
    spec = api.ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                               classes=[["sky"], ["tree", "bush"], ["road"]], size=224, templates="single")
    return api.export_image_graph(spec, out)


def test_cli_build_dry_run_writes_fp16_graph_and_plans_the_engine(exported, capsys):
    rc = cli_main(["build", str(exported), "--precision", "fp16", "--batch", "1:4:16", "--dry-run",
                   "--target-trt", "10.3.0.30", "--target-sm", "87", "--workspace-gb", "2", "--opt-level", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    fp16_onnx = exported.with_name("sclip.fp16.onnx")
    src_manifest = read_manifest(exported.with_suffix(".json"))
    manifest = read_manifest(exported.with_name("sclip.fp16.json"))
    from clipfuse.runtime.fileio import sha256_file
    assert manifest["precision"] == "fp16" and manifest["onnx_file"] == "sclip.fp16.onnx"
    assert manifest["onnx_sha256"] == sha256_file(fp16_onnx)
    assert manifest["source_onnx_sha256"] == src_manifest["onnx_sha256"] == sha256_file(exported)
    assert manifest["classes"] == src_manifest["classes"] and manifest["fp16"]["fp32_nodes"] > 0
    expected = f"sclip.trt10.3-sm87-fp16-b1_4_16-{manifest['onnx_sha256'][:8]}.engine"
    assert expected in out and "--stronglyTyped" in out and "--minShapes=image:1x224x224x3" in out
    assert "--memPoolSize=workspace:2048M" in out and "dry run: no engine built" in out
    assert manifest["engine_plan"]["file"] == expected and "--stronglyTyped" in manifest["engine_plan"]["command"]
    assert manifest["engine_plan"]["flavour"] == "tensorrt" and manifest["engine_plan"]["targets"] == ["87"]
    assert not list(exported.parent.glob("*.engine"))
    # I/O contract unchanged and the FP16 graph runs on ONNX Runtime CPU
    model = onnx.load(str(fp16_onnx))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ort = pytest.importorskip("onnxruntime")
    image = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    ref = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    got = ort.InferenceSession(str(fp16_onnx), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    assert got.shape == ref.shape == (2, 3, 14, 14) and np.abs(got - ref).max() <= 1e-2


def test_cli_build_refuses_bad_input(exported, tmp_path, capsys):
    assert cli_main(["build", str(exported), "--batch", "4:1:2", "--dry-run"]) == 2
    assert "need 1 <= MIN <= OPT <= MAX" in capsys.readouterr().err
    fp16 = exported.with_name("sclip.fp16.onnx")
    if fp16.exists():
        assert cli_main(["build", str(fp16), "--dry-run"]) == 2
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(exported.read_bytes())
    assert cli_main(["build", str(lonely), "--dry-run"]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_cli_build_refuses_a_graph_that_fails_the_checks(tmp_path, capsys):
    from onnx import TensorProto, helper

    from clipfuse.export.artifacts import set_contract
    from clipfuse.runtime.fileio import sha256_file
    from clipfuse.runtime.manifest import new_manifest, write_manifest

    img = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "h", 224, 3])
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "h", 224, 3])
    graph = helper.make_graph([helper.make_node("Cast", ["image"], ["scores"], to=TensorProto.FLOAT)],
                              "g", [img], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "dyn.onnx"
    manifest = new_manifest("image", inputs=[], outputs=[], precision="fp32")
    set_contract(model, manifest)  # a well-formed artifact, so the graph checks are what refuse it
    onnx.save(model, str(path))
    manifest["onnx_sha256"] = sha256_file(path)
    write_manifest(tmp_path / "dyn.json", manifest)
    assert cli_main(["build", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "dynamic H=h" in err and "fails 1 build check" in err
    assert not (tmp_path / "dyn.fp16.onnx").exists()


def test_build_with_enterprise_tensorrt_missing_says_so(exported, capsys):
    from clipfuse.runtime import trt_support
    if trt_support.probe("tensorrt"):
        pytest.skip("enterprise tensorrt imports here; this checks the message where it does not")
    assert cli_main(["build", str(exported), "--precision", "fp32", "--trt", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT (module tensorrt) is not usable here" in err and len(err.strip().splitlines()) == 1
    assert not list(exported.parent.glob("*.engine"))


# --- TensorRT + GPU: build and load for real ----------------------------------------------------

def _need_tensorrt_gpu() -> tuple:
    """(flavour, sm): an installed TensorRT flavour whose engines run on this GPU, or a skip that
    says why not and what serves this GPU (trt_support's flavour x GPU table)."""
    from clipfuse.runtime import trt_support
    if not trt_support.available():
        pytest.skip("neither tensorrt nor tensorrt_rtx imports: engine execution needs one and a CUDA GPU")
    sm = trt_support.device_sm()
    if sm is None:
        pytest.skip("no CUDA GPU visible (cuda-python / nvidia-smi): engine execution needs one")
    try:
        return trt_support.choose_for_device(None, sm), sm
    except ClipfuseError as exc:
        pytest.skip(str(exc))


def _flavour_args(flavour: str, sm: str) -> list:
    # RTX: this GPU's target only (a short build); enterprise TensorRT builds for this GPU anyway
    return ["--trt", flavour] + (["--target-sm", sm] if flavour == "rtx" else [])


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_build_and_run_matches_onnx(exported, precision, capsys):
    flavour, sm = _need_tensorrt_gpu()
    from clipfuse.runtime.backends import open_backend

    assert cli_main(["build", str(exported), "--precision", precision, "--batch", "1:2:4",
                     "--workspace-gb", "1", *_flavour_args(flavour, sm)]) == 0
    engines = sorted(exported.parent.glob(f"sclip.*-{precision}-b1_2_4-*.engine"))
    assert len(engines) == 1
    manifest = read_manifest(engines[0].with_suffix(".json"))
    assert manifest["engine"]["precision"] == precision and manifest["engine"]["batch_profile"] == [1, 2, 4]
    if manifest["engine"]["flavour"] == "tensorrt":
        assert Path(exported.parent / manifest["engine"]["timing_cache"]).is_file()
    ort = pytest.importorskip("onnxruntime")
    image = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    ref = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    for graph in (False, True):
        with open_backend(engines[0], manifest, backend="tensorrt", cuda_graph=graph) as backend:
            assert backend.max_batch == 4
            got = backend.run({"image": image})["scores"]
            again = backend.run({"image": image[:1]})["scores"]
        assert np.isfinite(got).all() and got.shape == ref.shape
        assert np.abs(got - ref).max() <= (1e-2 if precision == "fp16" else 1e-3)
        assert np.abs(again - got[:1]).max() <= 1e-3


@pytest.mark.tensorrt
def test_tensorrt_backend_refuses_foreign_engine(exported, tmp_path):
    flavour, sm = _need_tensorrt_gpu()
    from clipfuse.runtime.backends import open_backend

    fake = tmp_path / "x.engine"
    fake.write_bytes(b"not an engine")
    manifest = json.loads(exported.with_suffix(".json").read_text())
    manifest["engine"] = {"flavour": flavour, "tensorrt_version": "0.1", "targets": ["10"]}
    with pytest.raises(ClipfuseError, match="0.1, this machine has"):
        open_backend(fake, manifest, backend="tensorrt")


def test_cli_dry_run_for_tensorrt_8_6_uses_the_weak_typed_fallback(exported, capsys):
    assert cli_main(["build", str(exported), "--dry-run", "--target-trt", "8.6.2", "--target-sm", "87"]) == 0
    captured = capsys.readouterr()
    line = next(ln for ln in captured.out.splitlines() if ln.strip().startswith("trtexec --onnx"))
    args = shlex.split(line)
    assert "--fp16" in args and "--stronglyTyped" not in args
    # weak typing builds from the FP32 graph (named with its hash), not the FP16 one
    from clipfuse.runtime.fileio import sha256_file
    assert f"--onnx={exported}" in args and sha256_file(exported)[:8] in line
    assert "sclip.trt8.6-sm87-fp16-b1_4_16-" in line


@pytest.mark.tensorrt
def test_compare_engine_vs_onnx_fp32(exported, capsys):
    """Item 7 of issue 11 on a GPU: `clipfuse compare` of the FP16 engine against the FP32 graph."""
    flavour, sm = _need_tensorrt_gpu()
    assert cli_main(["build", str(exported), "--precision", "fp16", "--batch", "1:4:8", "--workspace-gb", "1",
                     *_flavour_args(flavour, sm)]) == 0
    engine = sorted(exported.parent.glob("sclip.*-fp16-b1_4_8-*.engine"))[-1]
    street = str(Path(__file__).parent / "data" / "street.jpg")
    assert cli_main(["compare", str(exported), str(engine), "--images", street, "--atol", "2e-2"]) == 0
    assert "ok" in capsys.readouterr().out
