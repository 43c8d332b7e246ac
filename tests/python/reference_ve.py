"""SNLI-VE fine-tuning steps in an independent PyTorch implementation, against the Rust
trainer's, for crates/albef-train/tests/train.rs.

    reference_ve.py DIR

The model is the reference's models/model_ve.py over torch_step.py's encoders (no code of ours):
the image encoder; the text encoder (a BertModel: no MLM head) run over all its layers with the
image as cross-attention from fusion_layer on; cls_head = Linear(h, h), ReLU, Linear(h, 3) on the
fused [CLS]; momentum copies of the three, updated by EMA inside the forward before the momentum
model runs (in training mode, as the reference's); the loss
(1 - alpha) * CE(prediction, label) - alpha * mean(sum(log_softmax(prediction) * softmax(prediction_m))).
The optimizer is reference_training.py's. DIR holds config.json, steps.json (each step's lr, alpha
and the Rust loss), step-K/ (the Rust checkpoint after K steps), inputs-K and grads-K. Each step,
resumed here from the checkpoint before it, must give the trainer's loss, gradients and state
after it within 1e-5.
"""
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import reference_training as rt
from torch_step import BertForMaskedLM, VisionTransformer


class VeAlbef(nn.Module):
    def __init__(self, model):
        super().__init__()
        h = model["bert"]["hidden_size"]
        self.model = model
        self.visual_encoder = VisionTransformer(model, sdpa=False)
        self.text_encoder = BertForMaskedLM(model["bert"], sdpa=False)
        del self.text_encoder.transform, self.text_encoder.transform_norm, self.text_encoder.decoder_bias
        self.cls_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 3))
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder).requires_grad_(False)
        self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.cls_head_m = copy.deepcopy(self.cls_head).requires_grad_(False)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m], [self.text_encoder, self.text_encoder_m],
                            [self.cls_head, self.cls_head_m]]

    def _momentum_update(self):
        rt.momentum_update(self.model_pairs, self.model["momentum"])

    def forward(self, image, ids, mask, targets, alpha):
        image_embeds = self.visual_encoder(image)
        bert = self.text_encoder
        output = bert.encode(bert.embed(ids), mask, image_embeds, bert.layer)
        prediction = self.cls_head(output[:, 0, :])
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            bert_m = self.text_encoder_m
            output_m = bert_m.encode(bert_m.embed(ids), mask, image_embeds_m, bert_m.layer)
            prediction_m = self.cls_head_m(output_m[:, 0, :])
        loss = (1 - alpha) * F.cross_entropy(prediction, targets) - alpha * torch.sum(
            F.log_softmax(prediction, dim=1) * F.softmax(prediction_m, dim=1), dim=1).mean()
        return loss


def build(cfg, model_file):
    module = VeAlbef(cfg["model"]).train()
    return module, rt.load_state(module, model_file)[1]


def forward(module, inputs, step):
    loss = module(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"], step["alpha"])
    return loss, {"ve": loss.item()}


if __name__ == "__main__":
    rt.check_resumed_steps(Path(sys.argv[1]), build, forward, "SNLI-VE")
