"""NLVR2 steps in an independent PyTorch implementation, against the Rust trainer's, for
crates/albef-train/tests/train.rs.

    reference_nlvr.py DIR

config.json's `task` says which:
- `nlvr`: the reference's models/model_nlvr.py. The text encoder has fusion_layer + 2 x (its fusion
  layers) blocks; in each pair of fusion blocks the first cross-attends to image 0, the second to
  image 1, and the first's cross-attention key and value modules are the second's (the
  reference's share_cross_attention). The images go through the image encoder as one batch
  (image 0 of every row, then image 1) and are split back; cls_head = Linear(h, h), ReLU,
  Linear(h, 2) on the fused [CLS]; momentum copies of the three, updated by EMA inside the forward
  before the momentum model runs; loss (1 - alpha) * CE - alpha * mean(sum(log_softmax(p) *
  softmax(p_m))).
- `nlvr_pretrain`: the reference's models/model_pretrain_nlvr.py (text assignment): the image
  tokens of the images each row's draw put in slot 0 and slot 1 (the Rust draws, injected as
  `slots`, with their `ta_labels`), the same paired encoder, ta_head = Linear(h, 3), cross-entropy.
  vision_proj only weighs the draws (no gradient reaches it).
The encoders are torch_step.py's (no code of ours); the optimizer is reference_training.py's.
Each step, resumed here from the trainer's checkpoint before it, must give the trainer's loss,
gradients and state after it within 1e-5.
"""
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import reference_training as rt
from torch_step import BertForMaskedLM, VisionTransformer


def paired_text_encoder(model):
    """A BertModel with NLVR2's paired fusion blocks, tied as share_cross_attention ties them."""
    b = dict(model["bert"])
    fusion, pairs = b["fusion_layer"], b["num_hidden_layers"] - b["fusion_layer"]
    b["num_hidden_layers"] = fusion + 2 * pairs
    bert = BertForMaskedLM(b, sdpa=False)
    del bert.transform, bert.transform_norm, bert.decoder_bias
    for i in range(pairs):
        first, second = bert.layer[fusion + 2 * i].crossattention, bert.layer[fusion + 2 * i + 1].crossattention
        first.key, first.value = second.key, second.value
    return bert


def encode_pair(bert, ids, mask, image0, image1):
    """All layers over the text, fusion layer fusion + i reading [image0, image1][i % 2]."""
    x = bert.embed(ids)
    mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i, layer in enumerate(bert.layer):
        image = None if i < bert.fusion_layer else (image0, image1)[(i - bert.fusion_layer) % 2]
        x = layer(x, mask, image)
    return x


class NlvrAlbef(nn.Module):
    def __init__(self, model):
        super().__init__()
        h = model["bert"]["hidden_size"]
        self.model = model
        self.visual_encoder = VisionTransformer(model, sdpa=False)
        self.text_encoder = paired_text_encoder(model)
        self.cls_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder).requires_grad_(False)
        self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.cls_head_m = copy.deepcopy(self.cls_head).requires_grad_(False)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m], [self.text_encoder, self.text_encoder_m],
                            [self.cls_head, self.cls_head_m]]

    def _momentum_update(self):
        rt.momentum_update(self.model_pairs, self.model["momentum"])

    def predict(self, visual, bert, head, image, ids, mask, n):
        image_embeds = visual(torch.cat([image[:, 0], image[:, 1]]))
        image0, image1 = torch.split(image_embeds, n)
        return head(encode_pair(bert, ids, mask, image0, image1)[:, 0, :])

    def forward(self, image, ids, mask, targets, alpha):
        n = targets.size(0)
        prediction = self.predict(self.visual_encoder, self.text_encoder, self.cls_head, image, ids, mask, n)
        with torch.no_grad():
            self._momentum_update()
            prediction_m = self.predict(self.visual_encoder_m, self.text_encoder_m, self.cls_head_m, image, ids, mask, n)
        return (1 - alpha) * F.cross_entropy(prediction, targets) - alpha * torch.sum(
            F.log_softmax(prediction, dim=1) * F.softmax(prediction_m, dim=1), dim=1).mean()


class TextAssignment(nn.Module):
    def __init__(self, model):
        super().__init__()
        h = model["bert"]["hidden_size"]
        self.visual_encoder = VisionTransformer(model, sdpa=False)
        self.vision_proj = nn.Linear(model["vision"]["vision_width"], model["embed_dim"]).requires_grad_(False)
        self.text_encoder = paired_text_encoder(model)
        self.ta_head = nn.Linear(h, 3)

    def forward(self, image, ids, mask, slots, labels):
        image_embeds = self.visual_encoder(image)
        output = encode_pair(self.text_encoder, ids, mask, image_embeds[slots[:, 0]], image_embeds[slots[:, 1]])
        return F.cross_entropy(self.ta_head(output[:, 0, :]), labels)


def build(cfg, model_file):
    """The module with the trainer's state; the first block of each pair reads its tied key and
    value from the second's names (the trainer holds them there only)."""
    module = (NlvrAlbef if cfg["task"] == "nlvr" else TextAssignment)(cfg["model"]).train()
    state = load_file(model_file)
    names = {rt.module_name(k): k for k in state if rt.module_name(k) is not None}
    b = cfg["model"]["bert"]
    for prefix in ("text_encoder", "text_encoder_m"):
        for i in range(b["num_hidden_layers"] - b["fusion_layer"]):
            first = b["fusion_layer"] + 2 * i
            for part in ("key.weight", "key.bias", "value.weight", "value.bias"):
                second = names.get(f"{prefix}.layer.{first + 1}.crossattention.{part}")
                if second is not None:
                    names[f"{prefix}.layer.{first}.crossattention.{part}"] = second
    own = module.state_dict()
    assert set(names) == set(own), sorted(set(names) ^ set(own))[:10]
    module.load_state_dict({k: state[names[k]] for k in own}, strict=True)
    return module, names


def forward(module, inputs, step):
    if isinstance(module, NlvrAlbef):
        loss = module(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"], step["alpha"])
        return loss, {"nlvr": loss.item()}
    loss = module(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["slots"], inputs["ta_labels"])
    return loss, {"ta": loss.item()}


if __name__ == "__main__":
    rt.check_resumed_steps(Path(sys.argv[1]), build, forward, "NLVR2")
