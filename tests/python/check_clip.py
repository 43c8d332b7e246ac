"""Gradient clipping against PyTorch's, for crates/albef-train/tests/train.rs.

    check_clip.py DIR

DIR/before.safetensors holds gradients, DIR/after.safetensors the same clipped by the trainer's
optimizer to DIR/clip.json's max_norm, with the norm it reported. torch.nn.utils.clip_grad_norm_
on parameters holding the `before` gradients must report the same norm and leave the same
gradients within 1e-6.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

directory = Path(sys.argv[1])
before, after = load_file(directory / "before.safetensors"), load_file(directory / "after.safetensors")
max_norm = json.loads((directory / "clip.json").read_text())["max_norm"]
params = {}
for name, grad in before.items():
    params[name] = torch.nn.Parameter(torch.zeros_like(grad))
    params[name].grad = grad.clone()
norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
reported = after.pop("norm")
assert abs(norm.item() - reported.item()) <= 1e-6 * max(1.0, norm.item()), (norm.item(), reported.item())
worst = max((params[n].grad - g).abs().max().item() for n, g in after.items())
assert worst <= 1e-6, worst
print(f"clip to {max_norm}: norm {norm.item():.6f} as PyTorch's; clipped gradients within {worst:.1e}")
