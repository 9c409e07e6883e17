"""Weight loading: checkpoint files in open_clip and OpenAI formats written by the tests,
the QuickGELU decision, strict key/shape errors, and CLIP-DINOiser's heads checkpoint."""
from __future__ import annotations

import pytest
import torch

from clipfuse.export.weights import load_clip
from clipfuse.export.heads.dinoiser import load_dinoiser_heads
from clipfuse.runtime.errors import ClipfuseError

from conftest import TINY


def _act_name(model) -> str:
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def source():
    return load_clip(TINY, "none", seed=11)


def test_random_init_is_reproducible_by_seed(source):
    assert _same_weights(load_clip(TINY, "none", seed=11).model, source.model)
    assert not _same_weights(load_clip(TINY, "none", seed=12).model, source.model)
    assert _act_name(source.model) == "GELU" and source.quick_gelu is False


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_open_clip_format_file(tmp_path, source, wrap):
    state = source.model.state_dict()
    if wrap == "state_dict":
        obj = {"epoch": 3, "state_dict": state}
    elif wrap == "module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        obj = state
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    loaded = load_clip(TINY, str(path), quick_gelu=False, seed=99)
    assert _same_weights(loaded.model, source.model)
    assert loaded.checkpoint_format == "open_clip"
    assert loaded.quick_gelu is False and _act_name(loaded.model) == "GELU"
    assert loaded.pretrained_id.startswith("file:ckpt.pt@sha256:")


def test_openai_state_dict_format_selects_quickgelu(tmp_path, source):
    # OpenAI's weights are fp16 and carry three extra entries
    state = {k: v.half() for k, v in source.model.state_dict().items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    path = tmp_path / "openai.pt"
    torch.save(state, path)
    loaded = load_clip(TINY, str(path))
    assert loaded.checkpoint_format == "openai-state-dict"
    assert loaded.quick_gelu is True and _act_name(loaded.model) == "QuickGELU"
    w = loaded.model.visual.conv1.weight
    assert w.dtype == torch.float32
    assert torch.allclose(w, source.model.visual.conv1.weight.half().float())


def test_openai_torchscript_archive(tmp_path, source):
    path = tmp_path / "ViT-T.pt"
    torch.jit.save(torch.jit.script(source.model), str(path))
    loaded = load_clip(TINY, str(path))
    assert loaded.checkpoint_format == "openai-jit"
    assert loaded.quick_gelu is True
    assert _same_weights(loaded.model, source.model)


def test_quick_gelu_can_be_forced_off(tmp_path, source):
    path = tmp_path / "openai.pt"
    torch.jit.save(torch.jit.script(source.model), str(path))
    assert _act_name(load_clip(TINY, str(path), quick_gelu=False).model) == "GELU"


def test_wrong_shape_names_the_key(tmp_path, source):
    state = dict(source.model.state_dict())
    state["visual.proj"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ClipfuseError, match=r"key 'visual.proj' has shape \[3, 3\], expected \[128, 64\]"):
        load_clip(TINY, str(path))


def test_missing_key_names_the_key(tmp_path, source):
    state = dict(source.model.state_dict())
    del state["visual.ln_post.weight"]
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ClipfuseError, match="missing key 'visual.ln_post.weight'"):
        load_clip(TINY, str(path))


def test_checkpoint_of_other_architecture(tmp_path, source):
    state = dict(source.model.state_dict())
    state["visual.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ClipfuseError, match="unexpected key 'visual.extra.weight'"):
        load_clip(TINY, str(path))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ClipfuseError, match="cannot read checkpoint .*corrupt.pt"):
        load_clip(TINY, str(path))


def test_unknown_tag_and_missing_file():
    with pytest.raises(ClipfuseError, match="unknown pretrained tag 'nope'"):
        load_clip(TINY, "nope")
    with pytest.raises(ClipfuseError, match="checkpoint file not found"):
        load_clip(TINY, "/no/such/file.pt")
    with pytest.raises(ClipfuseError, match="unknown model"):
        load_clip("ViT-B-17", "none")


def _dinoiser_ckpt(width: int, **changes):
    state = {"obj_proj.weight": torch.randn(256, width, 3, 3), "obj_proj.bias": torch.randn(256),
             "bkg_decoder.weight": torch.randn(1, width, 1, 1), "bkg_decoder.bias": torch.randn(1)}
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return {"epoch": 7, "model_state_dict": state}


def test_dinoiser_heads_checkpoint_roundtrip(tmp_path):
    ckpt = _dinoiser_ckpt(128)
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    heads, source = load_dinoiser_heads(str(path), 128)
    assert source.startswith("file:last.pt@sha256:")
    assert torch.equal(heads.obj_proj.weight, ckpt["model_state_dict"]["obj_proj.weight"])
    assert heads.obj_proj.padding_mode == "replicate"
    assert torch.equal(heads.bkg_decoder.bias, ckpt["model_state_dict"]["bkg_decoder.bias"])


@pytest.mark.parametrize("changes,message", [
    ({"obj_proj__weight": torch.zeros(256, 768, 3, 3)}, r"key 'obj_proj.weight' has shape \[256, 768, 3, 3\]"),
    ({"bkg_decoder__bias": None}, "missing key 'bkg_decoder.bias'"),
    ({"extra__weight": torch.zeros(1)}, "unexpected key 'extra.weight'"),
])
def test_dinoiser_heads_checkpoint_errors(tmp_path, changes, message):
    path = tmp_path / "last.pt"
    torch.save(_dinoiser_ckpt(128, **changes), path)
    with pytest.raises(ClipfuseError, match=message):
        load_dinoiser_heads(str(path), 128)


def test_dinoiser_heads_checkpoint_without_model_state_dict(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1, "weights": {}}, path)
    with pytest.raises(ClipfuseError, match="no 'model_state_dict'"):
        load_dinoiser_heads(str(path), 128)
