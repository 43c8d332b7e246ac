"""Loads `albef model export` files the way a PyTorch user of the reference ALBEF code would:
strictly, into a module laid out as the reference's (tests/python/reference_albef.py, built from
timm and transformers, not from our code).

    check_export.py full EXPORT CHECKPOINT_MODEL ONLINE STEP
        EXPORT is a trained checkpoint's full export: the same tensors as the checkpoint's own
        model file, strict loading with real values, tied decoder alias, metadata with the step
        and configuration; ONLINE (the --online-only export) is the same minus what only
        pretraining needs.
    check_export.py pth EXPORT_PTH EXPORT
        EXPORT_PTH (`--format pth`) is what the reference's scripts read: torch.load with
        weights_only=True (PyTorch's restricted unpickler), the state under "model", the same
        tensors as the safetensors EXPORT, strict loading into the reference layout.
    check_export.py layout EXPORT TENSORS ELEMENTS
        every name, shape and dtype of EXPORT against the reference layout of the configuration
        in its metadata, read from the header alone (the base preset is 2 GB); the counts must be
        TENSORS and ELEMENTS.
"""
import json
import math
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from reference_albef import is_pretraining_only, reference_module

SAFETENSORS_DTYPE = {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16", torch.float16: "F16"}
POSITION_IDS = ("text_encoder.bert.embeddings.position_ids", "text_encoder_m.bert.embeddings.position_ids")


def metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def check_layout(path, module):
    """Every entry of the file has the name, shape and dtype the reference module has, and the
    other way round; the position ids are the reference's arange. Reads only the header (and
    the two small position-id tensors)."""
    expected = module.state_dict()
    with safe_open(path, "pt") as f:
        names = set(f.keys())
        missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
        assert not missing and not unexpected, f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        meta_state = {}
        for name in sorted(names):
            s = f.get_slice(name)
            shape, dtype = list(s.get_shape()), s.get_dtype()
            want = expected[name]
            assert shape == list(want.shape), f"{name}: shape {shape}, reference {list(want.shape)}"
            assert dtype == SAFETENSORS_DTYPE[want.dtype], f"{name}: dtype {dtype}, reference {want.dtype}"
            meta_state[name] = torch.empty(shape, dtype=want.dtype, device="meta")
        for name in POSITION_IDS:
            ids = f.get_tensor(name)
            n = expected[name].shape[1]
            assert torch.equal(ids, torch.arange(n).expand((1, -1))), f"{name} is not arange({n})"
    # The strict load itself (no memory: the module and the tensors are on the meta device).
    module.load_state_dict(meta_state, strict=True, assign=True)
    return len(names), sum(math.prod(t.shape) for t in meta_state.values())


def check_full(exported, checkpoint_model, online_path, step):
    meta = metadata(exported)
    assert meta["format"] == "pt" and int(meta["albef.step"]) == step, meta
    config = json.loads(meta["albef.config"])
    assert config["model"]["preset"] == "albef-small"
    check_layout(exported, reference_module(config["model"]))

    full, reference = load_file(exported), load_file(checkpoint_model)
    assert full.keys() == reference.keys(), sorted(set(full) ^ set(reference))[:10]
    for name, t in reference.items():
        assert torch.equal(full[name], t), name
    assert torch.equal(
        full["text_encoder.cls.predictions.decoder.weight"], full["text_encoder.bert.embeddings.word_embeddings.weight"]
    ), "the tied decoder alias"
    # A strict load with real values, into a real (not meta) module.
    module = reference_module(config["model"]).to_empty(device="cpu")
    module.load_state_dict(full, strict=True)
    assert torch.equal(module.text_encoder.bert.embeddings.position_ids, torch.arange(
        config["model"]["bert"]["max_position_embeddings"]).expand((1, -1)))

    online = load_file(online_path)
    assert online.keys() == {k for k in full if not is_pretraining_only(k)}
    result = module.load_state_dict(online, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(is_pretraining_only(k) for k in result.missing_keys) and result.missing_keys
    print(f"export ok: {len(full)} tensors, {len(online)} online, strict load into the reference layout")


def check_pth(exported_pth, exported):
    config = json.loads(metadata(exported)["albef.config"])
    state = torch.load(exported_pth, weights_only=True)["model"]
    reference = load_file(exported)
    assert state.keys() == reference.keys(), sorted(set(state) ^ set(reference))[:10]
    for name, t in reference.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name
    module = reference_module(config["model"]).to_empty(device="cpu")
    module.load_state_dict(state, strict=True)
    print(f"pth ok: {len(state)} tensors, strict load into the reference layout")


def check_counts(exported, tensors, elements):
    config = json.loads(metadata(exported)["albef.config"])
    n, e = check_layout(exported, reference_module(config["model"]))
    assert (n, e) == (tensors, elements), f"{n} tensors, {e} elements; expected {tensors}, {elements}"
    print(f"layout ok: {config['model']['preset']}: {n} tensors, {e:,} elements match the reference layout")


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "full":
        check_full(args[0], args[1], args[2], int(args[3]))
    elif mode == "pth":
        check_pth(args[0], args[1])
    elif mode == "layout":
        check_counts(args[0], int(args[1]), int(args[2]))
    else:
        sys.exit(f"unknown mode {mode!r}")
