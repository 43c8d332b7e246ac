"""Retrieval fine-tuning steps in an independent PyTorch implementation, against the Rust
trainer's, for crates/albef-train/tests/train.rs.

    reference_retrieval.py DIR

The model is the reference's models/model_retrieval.py written over torch_step.py's encoders (no
code of ours): pretraining's encoders, projections and ITM head, no MLM head; an `idx_queue` of
image indexes beside the feature queues. Its forward, as the reference's:
- the EMA of the momentum weights, then ITC whose targets are the image-index positives
  (`idx == [idx, idx_queue]`, each row divided by its count) mixed with the momentum model's
  softmax by alpha; no temperature clamp;
- the queues (features and indexes) take the step's momentum rows after the contrastive loss;
- ITM over the pairs and one hard negative per image and per text, drawn by the softmax of the
  similarities with every pair of the same image weighing 0 (the draws are injected: the ones
  the Rust trainer drew).
The optimizer is reference_training.py's (timm's AdamW groups). DIR holds config.json,
steps.json (each step's lr, alpha and the Rust losses), step-K/ (the Rust checkpoint after K
steps), inputs-K and grads-K. Each step, resumed here from the checkpoint before it, must give
the trainer's losses, gradients and state after it within 1e-5, the index queue exactly.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import reference_training as rt
from torch_step import Albef


class RetrievalAlbef(Albef):
    """model_retrieval.ALBEF: the text encoder is a BertModel (no MLM head), plus idx_queue."""

    def __init__(self, model):
        super().__init__(model, best=False)
        for bert in (self.text_encoder, self.text_encoder_m):
            del bert.transform, bert.transform_norm, bert.decoder_bias
        self.register_buffer("idx_queue", torch.full((1, model["queue_size"]), -100, dtype=torch.long))
        online = [self.visual_encoder, self.vision_proj, self.text_encoder, self.text_proj]
        momentum = [self.visual_encoder_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m]
        self.online_params = [p for m in online for p in m.parameters()]
        self.momentum_params = [p for m in momentum for p in m.parameters()]

    @torch.no_grad()
    def enqueue_with_idx(self, image_feat, text_feat, idx):
        slots = (torch.arange(image_feat.size(0)) + self.queue_ptr) % self.image_queue.size(1)
        self.idx_queue[:, slots] = idx.view(1, -1)
        self.enqueue(image_feat, text_feat)

    def forward(self, image, ids, mask, idx):
        alpha, bs = self.model["alpha"], image.size(0)
        bert, bert_m = self.text_encoder, self.text_encoder_m
        image_embeds = self.visual_encoder(image)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = bert.text(ids, mask)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        with torch.no_grad():
            self.momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(image)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(bert_m.text(ids, mask)[:, 0]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_all / self.temp, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_all / self.temp, dim=1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2
        self.enqueue_with_idx(image_feat_m, text_feat_m, idx)

        output_pos = bert.fusion(text_embeds, mask, image_embeds)
        with torch.no_grad():
            same = torch.eq(idx, idx.t())
            weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1).masked_fill(same, 0)
            weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1).masked_fill(same, 0)
        image_neg = self.negatives(weights_t2i)  # a negative image for each text
        text_neg = self.negatives(weights_i2t)  # a negative text for each image
        assert not same[torch.arange(bs), image_neg].any() and not same[torch.arange(bs), text_neg].any(), \
            "a drawn negative shows the same image"
        text_all = torch.cat([text_embeds, text_embeds[text_neg]])
        mask_all = torch.cat([mask, mask[text_neg]])
        image_all = torch.cat([image_embeds[image_neg], image_embeds])
        output_neg = bert.fusion(text_all, mask_all, image_all)
        vl_output = self.itm_head(torch.cat([output_pos[:, 0], output_neg[:, 0]]))
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
        loss_itm = F.cross_entropy(vl_output, itm_labels)
        self.last_losses = (loss_ita.detach(), loss_itm.detach())
        return loss_ita + loss_itm


def build(cfg, model_file):
    module = RetrievalAlbef(cfg["model"]).train()
    state, names = rt.load_state(module, model_file)
    module.queue_ptr = int(state["queue_ptr"].item())
    return module, names


def forward(module, inputs, step):
    negatives = [inputs["image_negatives"], inputs["text_negatives"]]  # images for texts first
    module.negatives = lambda weights: negatives.pop(0)
    module.model["alpha"] = step["alpha"]
    loss = module(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["image_ids"])
    assert not negatives, "both negatives were drawn"
    return loss, {"ita": module.last_losses[0].item(), "itm": module.last_losses[1].item()}


def queues_equal(module, after):
    assert torch.equal(module.idx_queue, after["idx_queue"]), (module.idx_queue, after["idx_queue"])
    assert module.queue_ptr == after["queue_ptr"].item(), (module.queue_ptr, after["queue_ptr"])
    return "; index queue equal"


if __name__ == "__main__":
    rt.check_resumed_steps(Path(sys.argv[1]), build, forward, "retrieval", queues_equal)
