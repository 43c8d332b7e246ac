"""VQA fine-tuning steps and answer ranking in an independent PyTorch implementation, against the
Rust trainer's, for crates/albef-train/tests/train.rs.

    reference_vqa.py DIR             the steps
    reference_vqa.py DIR --ranking   the answer ranking, with the state after the last step

The model is the reference's models/model_vqa.py over torch_step.py's encoder blocks (no code of
ours): the image encoder; the text encoder (no MLM head) over all its layers with the image as
cross-attention from fusion_layer on; the answer decoder, xbert's BertLMHeadModel with
fusion_layer 0: embeddings, num_hidden_layers - fusion_layer layers each with causal
self-attention (the reference's extended decoder mask, additive -10000) and cross-attention to
the question's states under the question's mask, and the LM head tied to its own word
embeddings. Momentum copies of the three, updated by EMA inside the forward before the momentum
model runs. The loss, as xbert's BertLMHeadModel with reduction='none' and soft labels: per
answer the summed next-token CE (padding ignored) and the summed soft-CE against the momentum
decoder's softmax, (1 - alpha) CE + alpha soft-CE, times the answer's weight, summed, over the
number of questions. rank_answer: the first token's probabilities after [CLS], the top k
candidates by their first token, each teacher-forced; score log p(first) - answer loss
(reference) or - answer loss (likelihood); the best.
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


class Decoder(BertForMaskedLM):
    """xbert's BertLMHeadModel with every layer cross-attending: its blocks and LM head are
    torch_step's (a BertForMaskedLM of the decoder's shape); the forward is written here."""

    def __init__(self, b):
        super().__init__(dict(b, num_hidden_layers=b["num_hidden_layers"] - b["fusion_layer"], fusion_layer=0),
                         sdpa=False)

    def forward(self, ids, mask, states, states_mask):
        bert = self
        length = ids.size(1)
        causal = torch.tril(torch.ones(length, length, device=ids.device))
        self_mask = (1.0 - (causal[None, :, :] * mask[:, None, :].float())[:, None, :, :]) * -10000.0
        cross_mask = (1.0 - states_mask[:, None, None, :].float()) * -10000.0
        x = bert.embed(ids)
        for layer in bert.layer:
            x = layer.attention(x, x, self_mask)
            x = layer.crossattention(x, states, cross_mask)
            y = F.dropout(layer.output(F.gelu(layer.intermediate(x))), layer.p_hidden, self.training)
            x = layer.norm(x + y)
        x = bert.transform_norm(F.gelu(bert.transform(x)))
        return F.linear(x, bert.word_embeddings.weight, bert.decoder_bias)


class VqaAlbef(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.pad = model["bert"]["pad_token_id"]
        self.visual_encoder = VisionTransformer(model, sdpa=False)
        self.text_encoder = BertForMaskedLM(model["bert"], sdpa=False)
        del self.text_encoder.transform, self.text_encoder.transform_norm, self.text_encoder.decoder_bias
        self.text_decoder = Decoder(model["bert"])
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder).requires_grad_(False)
        self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.text_decoder_m = copy.deepcopy(self.text_decoder).requires_grad_(False)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m], [self.text_encoder, self.text_encoder_m],
                            [self.text_decoder, self.text_decoder_m]]

    def _momentum_update(self):
        rt.momentum_update(self.model_pairs, self.model["momentum"])

    @staticmethod
    def question(visual, text, image, ids, mask):
        return text.encode(text.embed(ids), mask, visual(image), text.layer)

    def forward(self, image, ids, mask, answer_ids, answer_mask, weights, k, alpha):
        states = self.question(self.visual_encoder, self.text_encoder, image, ids, mask)
        question_states = torch.stack([states[b] for b, n in enumerate(k) for _ in range(n)])
        question_atts = torch.stack([mask[b] for b, n in enumerate(k) for _ in range(n)])
        with torch.no_grad():
            self._momentum_update()
            states_m = self.question(self.visual_encoder_m, self.text_encoder_m, image, ids, mask)
            question_states_m = torch.stack([states_m[b] for b, n in enumerate(k) for _ in range(n)])
            logits_m = self.text_decoder_m(answer_ids, answer_mask, question_states_m, question_atts)[:, :-1, :]
        logits = self.text_decoder(answer_ids, answer_mask, question_states, question_atts)
        shifted = logits[:, :-1, :]
        labels = answer_ids.masked_fill(answer_ids == self.pad, -100)[:, 1:]
        lm_loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels.reshape(-1), reduction="none")
        lm_loss = lm_loss.view(logits.size(0), -1).sum(1)
        distill = -torch.sum(F.log_softmax(shifted, dim=-1) * F.softmax(logits_m, dim=-1), dim=-1)
        distill = (distill * (labels != -100)).sum(1)
        answer_loss = (1 - alpha) * lm_loss + alpha * distill
        return (weights * answer_loss).sum() / image.size(0)

    @torch.no_grad()
    def rank_answer(self, image, ids, mask, answer_ids, answer_atts, k, scoring):
        states = self.question(self.visual_encoder, self.text_encoder, image, ids, mask)
        num_ques = states.size(0)
        start_ids = answer_ids[0, 0].repeat(num_ques, 1)
        logits = self.text_decoder(start_ids, torch.ones_like(start_ids), states, mask)[:, 0, :]
        prob_first_token = F.softmax(logits, dim=1).index_select(dim=1, index=answer_ids[:, 1])
        topk_probs, topk_ids = prob_first_token.topk(k, dim=1)
        input_ids = torch.cat([answer_ids.index_select(0, t) for t in topk_ids])
        input_atts = torch.cat([answer_atts.index_select(0, t) for t in topk_ids])
        targets = input_ids.masked_fill(input_ids == self.pad, -100)[:, 1:]
        tiled_states = torch.cat([states[b:b + 1].repeat(k, 1, 1) for b in range(num_ques)])
        tiled_atts = torch.cat([mask[b:b + 1].repeat(k, 1) for b in range(num_ques)])
        out = self.text_decoder(input_ids, input_atts, tiled_states, tiled_atts)[:, :-1, :]
        answer_loss = F.cross_entropy(out.reshape(-1, out.size(-1)), targets.reshape(-1), reduction="none")
        answer_loss = answer_loss.view(input_ids.size(0), -1).sum(1).view(num_ques, k)
        scores = -answer_loss + (topk_probs.log() if scoring == "reference" else 0.0)
        return torch.gather(topk_ids, 1, scores.argmax(1, keepdim=True)).squeeze(1)


def build(cfg, model_file):
    module = VqaAlbef(cfg["model"]).train()
    return module, rt.load_state(module, model_file)[1]


def forward(module, inputs, step):
    k = inputs["answer_per_row"].tolist()
    loss = module(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["answer_ids"],
                  inputs["answer_mask"], inputs["answer_weights"], k, step["alpha"])
    return loss, {"vqa": loss.item()}


def check_ranking(directory):
    steps = len(list(directory.glob("inputs-*.safetensors")))
    cfg = __import__("json").loads((directory / "config.json").read_text())
    module, _ = build(cfg, directory / f"step-{steps}" / "model.safetensors")
    module.eval()
    inputs = load_file(directory / "inputs-0.safetensors")
    ranking = load_file(directory / "ranking.safetensors")
    for scoring in ("reference", "likelihood"):
        chosen = module.rank_answer(inputs["image"], inputs["input_ids"], inputs["attention_mask"],
                                    ranking["candidate_ids"], ranking["candidate_mask"], 4, scoring)
        theirs = ranking[f"chosen_{scoring}"]
        assert torch.equal(chosen, theirs), f"{scoring}: {chosen.tolist()} vs the trainer's {theirs.tolist()}"
        print(f"answer ranking ({scoring}): the same answers as the trainer's model: {chosen.tolist()}")


if __name__ == "__main__":
    if sys.argv[2:] == ["--ranking"]:
        check_ranking(Path(sys.argv[1]))
    else:
        rt.check_resumed_steps(Path(sys.argv[1]), build, forward, "VQA")
