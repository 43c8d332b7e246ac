"""Grad-CAM as the reference's Grounding.py computes it (gradcam_mode 'itm' or 'itc'), in an
independent PyTorch implementation, for crates/albef-model/tests/gradcam.rs.

    reference_gradcam.py DIR

DIR holds config.json ({"model": <model config>, "mode": "itm" | "itc", "block": N}),
model.safetensors (an ALBEF retrieval model's state, reference names) and inputs.safetensors
(image, input_ids, attention_mask). Writes DIR/reference.safetensors with `cam` (B, grid, grid).

As Grounding.py, the model in eval mode:
- itm: the image through the image encoder, the text through every text-encoder layer (text
  layers, then the fusion layers cross-attending to all image tokens); loss = itm_head(fused
  [CLS])[:, 1].sum(); backward. Layer `block`'s cross-attention saves its softmax probabilities
  and their gradient (xbert's save_attention / register_hook). Then cams[:, :, :, 1:] and
  grads[:, :, :, 1:].clamp(min=0), each reshaped to (B, heads, L, grid, grid) and multiplied by
  the text mask, their product averaged over heads, then over text positions.
- itc: the image encoder with block `block`'s attention saved (vit.py's register_blk), image_feat
  = normalize(vision_proj([CLS])), text_feat = normalize(text_proj(text-mode [CLS])), loss =
  (image_feat @ text_feat.t() / temp).diag().sum(); backward; cam = attention[:, :, 0, 1:] and
  grad = gradient[:, :, 0, 1:].clamp(0), reshaped to (B, heads, grid, grid), (cam * grad).mean(1).
The encoders are torch_step.py's (no code of ours).
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import reference_training as rt
from torch_step import BertForMaskedLM, VisionTransformer, merge_heads, split_heads


class Saved:
    attention_map = None
    attn_gradients = None


def saving_cross_attention(attention, saved):
    """`attention`'s forward, computing its probabilities in the open and keeping them and their
    gradient, as xbert's BertSelfAttention does when save_attention is set."""

    def forward(x, kv, mask):
        q, k, v = (split_heads(f(t), attention.heads) for f, t in
                   ((attention.query, x), (attention.key, kv), (attention.value, kv)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(-1)
        saved.attention_map = probs
        probs.register_hook(lambda g: setattr(saved, "attn_gradients", g))
        return attention.norm(x + attention.dense(merge_heads(probs @ v)))

    return forward


def saving_vit_attention(block, saved):
    """`block`'s forward (torch_step's VitBlock), its attention computed in the open and kept with
    its gradient, as the reference's vit.py Attention does for the registered block."""

    def forward(x):
        b, n, _ = x.shape
        q, k, v = block.qkv(block.norm1(x)).view(b, n, 3, block.heads, -1).permute(2, 0, 3, 1, 4)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).softmax(-1)
        saved.attention_map = probs
        probs.register_hook(lambda g: setattr(saved, "attn_gradients", g))
        x = x + block.proj(merge_heads(probs @ v))
        return x + block.fc2(F.gelu(block.fc1(block.norm2(x))))

    return forward


class GroundingAlbef(nn.Module):
    def __init__(self, model):
        super().__init__()
        h, e = model["bert"]["hidden_size"], model["embed_dim"]
        self.visual_encoder = VisionTransformer(model, sdpa=False)
        self.text_encoder = BertForMaskedLM(model["bert"], sdpa=False)
        del self.text_encoder.transform, self.text_encoder.transform_norm, self.text_encoder.decoder_bias
        self.itm_head = nn.Linear(h, 2)
        self.vision_proj = nn.Linear(model["vision"]["vision_width"], e)
        self.text_proj = nn.Linear(h, e)
        self.temp = nn.Parameter(torch.tensor(model["temp"]))


def itm_cam(module, image, ids, mask, block, heads, grid, saved):
    bert = module.text_encoder
    cross = bert.layer[block].crossattention
    cross.forward = saving_cross_attention(cross, saved)
    image_embeds = module.visual_encoder(image)
    hidden = bert.encode(bert.embed(ids), mask, image_embeds, bert.layer)
    loss = module.itm_head(hidden[:, 0, :])[:, 1].sum()
    module.zero_grad()
    loss.backward()
    with torch.no_grad():
        b = image.size(0)
        m = mask.view(b, 1, -1, 1, 1)
        cams = saved.attention_map[:, :, :, 1:].reshape(b, heads, -1, grid, grid) * m
        grads = saved.attn_gradients[:, :, :, 1:].clamp(min=0).reshape(b, heads, -1, grid, grid) * m
        return (cams * grads).mean(1).mean(1)


def itc_cam(module, image, ids, mask, block, grid, saved):
    vit_block = module.visual_encoder.blocks[block]
    vit_block.forward = saving_vit_attention(vit_block, saved)
    image_embeds = module.visual_encoder(image)
    image_feat = F.normalize(module.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_embeds = module.text_encoder.text(ids, mask)
    text_feat = F.normalize(module.text_proj(text_embeds[:, 0, :]), dim=-1)
    sim = image_feat @ text_feat.t() / module.temp
    loss = sim.diag().sum()
    module.zero_grad()
    loss.backward()
    with torch.no_grad():
        b = image.size(0)
        grad = saved.attn_gradients[:, :, 0, 1:].reshape(b, -1, grid, grid).clamp(0)
        cam = saved.attention_map[:, :, 0, 1:].reshape(b, -1, grid, grid)
        return (cam * grad).mean(1)


def main(d):
    cfg = json.loads((d / "config.json").read_text())
    model, block = cfg["model"], cfg["block"]
    module = GroundingAlbef(model).eval()
    state = load_file(d / "model.safetensors")
    own = module.state_dict()
    names = {rt.module_name(k): k for k in state if rt.module_name(k) in own}
    assert set(names) == set(own), sorted(set(names) ^ set(own))[:10]
    module.load_state_dict({k: state[names[k]] for k in own}, strict=True)

    inputs = load_file(d / "inputs.safetensors")
    image, ids, mask = inputs["image"], inputs["input_ids"], inputs["attention_mask"]
    grid = model["image_res"] // model["vision"]["patch_size"]
    if cfg["mode"] == "itm":
        heads = model["bert"]["num_attention_heads"]
        cam = itm_cam(module, image, ids, mask, block, heads, grid, Saved())
    else:
        cam = itc_cam(module, image, ids, mask, block, grid, Saved())
    save_file({"cam": cam.contiguous()}, d / "reference.safetensors")
    print(f"cam {tuple(cam.shape)}, max {cam.max().item():.3e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
