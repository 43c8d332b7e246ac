"""Loads an `albef model export` file the way a PyTorch user would and checks it against the
checkpoint's own model file: same tensors under the reference ALBEF names, tied decoder aliases
present for strict loading, metadata with the step and the configuration."""
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

exported, checkpoint_model, online_path, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
full = load_file(exported)
reference = load_file(checkpoint_model)
assert full.keys() == reference.keys(), sorted(set(full) ^ set(reference))[:10]
for name, t in reference.items():
    assert torch.equal(full[name], t), name
for prefix in ("visual_encoder.", "text_encoder.bert.", "visual_encoder_m.", "text_encoder_m."):
    assert any(k.startswith(prefix) for k in full), prefix
for needed in ("image_queue", "text_queue", "queue_ptr", "temp", "itm_head.weight", "vision_proj.weight"):
    assert needed in full, needed
assert torch.equal(
    full["text_encoder.cls.predictions.decoder.weight"], full["text_encoder.bert.embeddings.word_embeddings.weight"]
), "the tied decoder alias"
with safe_open(exported, "pt") as f:
    meta = f.metadata()
assert meta["format"] == "pt" and int(meta["albef.step"]) == step, meta
assert json.loads(meta["albef.config"])["model"]["preset"] == "albef-small"

online = load_file(online_path)
assert online.keys() == {k for k in full if not (k.split(".")[0].endswith("_m") or k in ("image_queue", "text_queue", "queue_ptr"))}
# A module with exactly the online names loads it strictly.
module = torch.nn.Module()
for name, t in online.items():
    parent = module
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    parent.register_buffer(leaf, torch.zeros_like(t))
module.load_state_dict(online, strict=True)
print(f"export ok: {len(full)} tensors, {len(online)} online")
