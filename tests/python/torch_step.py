"""One ALBEF pretraining step in plain eager PyTorch, timed: the baseline for `albef bench`.

Usage:
    .venv/bin/python tests/python/torch_step.py --config CONFIG.json [--mode reference|best]
        [--batch 8] [--steps 20] [--warmup 5] [--device cpu|cuda] [--threads N] [--json out.json]
        [--check-params]

CONFIG.json is what `albef config` prints (e.g. `albef config --set model.preset=albef-small`).
This is an independent implementation of the step of salesforce/ALBEF (models/model_pretrain.py
and models/xbert.py): ViT and BERT written out here, no timm and no transformers, so it measures
what a user would otherwise run in PyTorch. `make bench` runs it beside `albef bench` on the CPU
and prints the ratios; both write the same JSON fields.

Modes:
- reference: fp32, attention written out as the reference code does (scores + additive -10000
  mask, softmax, dropout, @ v), per-sample `multinomial(...).item()` for the ITM negatives, a
  per-parameter momentum update, torch.optim.AdamW with its default implementation.
- best: what a strong engineer writes in eager: scaled_dot_product_attention, batched negative
  sampling on the device, a foreach momentum update, fused AdamW; on CUDA also bf16 autocast for
  the forward (losses in fp32) and TF32 matmuls.

--check-params builds the model on the meta device and compares its trainable parameter count
with the reference layout of reference_albef.py (timm + Hugging Face), without running a step.
"""

import argparse
import contextlib
import copy
import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# The flop counter has no formula for the CPU flash-attention kernel SDPA takes when no dropout
# applies (the ViT); without these, best mode on the CPU would not count its attention.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def attend(q, k, v, mask, dropout_p, sdpa):
    """Attention over (B, heads, T, head_dim). `mask`: for SDPA a boolean keep mask, otherwise
    the reference's additive one; None for no mask."""
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores + mask
    return F.dropout(scores.softmax(-1), dropout_p) @ v


def split_heads(x, heads):
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x):
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)


class VitBlock(nn.Module):
    def __init__(self, width, heads, mlp_dim, eps, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(merge_heads(attend(q, k, v, None, 0.0, self.sdpa)))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """timm's VisionTransformer as ALBEF uses it: no head, no dropout, all tokens out."""

    def __init__(self, model, sdpa):
        super().__init__()
        v = model["vision"]
        width, grid = v["vision_width"], model["image_res"] // v["patch_size"]
        self.patch_embed = nn.Conv2d(3, width, v["patch_size"], stride=v["patch_size"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self.blocks = nn.ModuleList(
            VitBlock(width, v["num_heads"], v["mlp_dim"], v["layer_norm_eps"], sdpa) for _ in range(v["depth"]))
        self.norm = nn.LayerNorm(width, eps=v["layer_norm_eps"])
        for p in [self.cls_token, self.pos_embed] + [m.weight for m in self.modules() if isinstance(m, nn.Linear)]:
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, image):
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class BertAttention(nn.Module):
    """Self-attention (kv_width = hidden) or cross-attention to the image tokens, post-norm."""

    def __init__(self, b, kv_width, sdpa):
        super().__init__()
        h = b["hidden_size"]
        self.heads, self.sdpa = b["num_attention_heads"], sdpa
        self.p_attn, self.p_hidden = b["attention_probs_dropout_prob"], b["hidden_dropout_prob"]
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(kv_width, h), nn.Linear(kv_width, h)
        self.dense = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=b["layer_norm_eps"])

    def forward(self, x, kv, mask):
        q, k, v = (split_heads(f(t), self.heads) for f, t in ((self.query, x), (self.key, kv), (self.value, kv)))
        context = attend(q, k, v, mask, self.p_attn if self.training else 0.0, self.sdpa)
        return self.norm(x + F.dropout(self.dense(merge_heads(context)), self.p_hidden, self.training))


class BertLayer(nn.Module):
    def __init__(self, b, cross, sdpa):
        super().__init__()
        h, eps = b["hidden_size"], b["layer_norm_eps"]
        self.p_hidden = b["hidden_dropout_prob"]
        self.attention = BertAttention(b, h, sdpa)
        self.crossattention = BertAttention(b, b["encoder_width"], sdpa) if cross else None
        self.intermediate = nn.Linear(h, b["intermediate_size"])
        self.output = nn.Linear(b["intermediate_size"], h)
        self.norm = nn.LayerNorm(h, eps=eps)

    def forward(self, x, mask, image):
        x = self.attention(x, x, mask)
        if self.crossattention is not None:
            x = self.crossattention(x, image, None)  # every image token is attended to
        y = F.dropout(self.output(F.gelu(self.intermediate(x))), self.p_hidden, self.training)
        return self.norm(x + y)


class BertForMaskedLM(nn.Module):
    """xbert's BertForMaskedLM: no pooler, cross-attention from `fusion_layer` on, tied decoder."""

    def __init__(self, b, sdpa):
        super().__init__()
        h, eps = b["hidden_size"], b["layer_norm_eps"]
        self.sdpa, self.fusion_layer, self.p_hidden = sdpa, b["fusion_layer"], b["hidden_dropout_prob"]
        self.word_embeddings = nn.Embedding(b["vocab_size"], h)
        self.position_embeddings = nn.Embedding(b["max_position_embeddings"], h)
        self.token_type_embeddings = nn.Embedding(b["type_vocab_size"], h)
        self.embed_norm = nn.LayerNorm(h, eps=eps)
        self.layer = nn.ModuleList(BertLayer(b, i >= b["fusion_layer"], sdpa) for i in range(b["num_hidden_layers"]))
        self.transform = nn.Linear(h, h)
        self.transform_norm = nn.LayerNorm(h, eps=eps)
        self.decoder_bias = nn.Parameter(torch.zeros(b["vocab_size"]))  # decoder weight = word_embeddings
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=b["initializer_range"])
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def embed(self, ids):
        positions = self.position_embeddings.weight[: ids.size(1)]
        x = self.word_embeddings(ids) + positions + self.token_type_embeddings.weight[0]  # token type 0
        return F.dropout(self.embed_norm(x), self.p_hidden, self.training)

    def encode(self, x, mask, image, layers):
        mask = mask[:, None, None, :]
        mask = mask.bool() if self.sdpa else (1.0 - mask.float()) * -10000.0
        for layer in layers:
            x = layer(x, mask, image)
        return x

    def text(self, ids, mask):
        return self.encode(self.embed(ids), mask, None, self.layer[: self.fusion_layer])

    def fusion(self, hidden, mask, image):
        return self.encode(hidden, mask, image, self.layer[self.fusion_layer:])

    def mlm_logits(self, ids, mask, image):
        x = self.encode(self.embed(ids), mask, image, self.layer)
        x = self.transform_norm(F.gelu(self.transform(x)))
        return F.linear(x, self.word_embeddings.weight, self.decoder_bias)


class Albef(nn.Module):
    def __init__(self, model, best):
        super().__init__()
        width, h, embed = model["vision"]["vision_width"], model["bert"]["hidden_size"], model["embed_dim"]
        self.model, self.best = model, best
        self.visual_encoder = VisionTransformer(model, sdpa=best)
        self.vision_proj = nn.Linear(width, embed)
        self.text_encoder = BertForMaskedLM(model["bert"], sdpa=best)
        self.text_proj = nn.Linear(h, embed)
        self.itm_head = nn.Linear(h, 2)
        self.temp = nn.Parameter(torch.tensor(float(model["temp"])))
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder).requires_grad_(False)
        self.vision_proj_m = copy.deepcopy(self.vision_proj).requires_grad_(False)
        self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.text_proj_m = copy.deepcopy(self.text_proj).requires_grad_(False)
        online = [self.visual_encoder, self.vision_proj, self.text_encoder, self.text_proj]
        momentum = [self.visual_encoder_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m]
        self.online_params = [p for m in online for p in m.parameters()]
        self.momentum_params = [p for m in momentum for p in m.parameters()]
        self.register_buffer("image_queue", F.normalize(torch.randn(embed, model["queue_size"]), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed, model["queue_size"]), dim=0))
        self.queue_ptr = 0  # a host int: no device read to find the slot

    @torch.no_grad()
    def momentum_update(self):
        m = self.model["momentum"]
        if self.best:
            torch._foreach_lerp_(self.momentum_params, self.online_params, 1.0 - m)
        else:
            for p, p_m in zip(self.online_params, self.momentum_params):
                p_m.data = p_m.data * m + p.data * (1.0 - m)

    @torch.no_grad()
    def enqueue(self, image_feat, text_feat):
        slots = torch.arange(self.queue_ptr, self.queue_ptr + image_feat.size(0), device=image_feat.device)
        slots = slots % self.image_queue.size(1)
        self.image_queue[:, slots] = image_feat.t().to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat.t().to(self.text_queue.dtype)
        self.queue_ptr = (self.queue_ptr + image_feat.size(0)) % self.image_queue.size(1)

    @torch.no_grad()
    def negatives(self, weights):
        """One index per row, drawn from that row's weights."""
        if self.best:
            return torch.multinomial(weights, 1).squeeze(1)
        rows = [torch.multinomial(weights[b], 1).item() for b in range(weights.size(0))]
        return torch.tensor(rows, device=weights.device)

    @torch.no_grad()
    def mask_tokens(self, ids):
        b = self.model["bert"]
        chosen = torch.rand(ids.shape, device=ids.device) < self.model["mlm_probability"]
        chosen &= (ids != b["pad_token_id"]) & (ids != b["cls_token_id"])
        labels = torch.where(chosen, ids, -100)
        replaced = chosen & (torch.rand(ids.shape, device=ids.device) < 0.8)
        randomised = chosen & ~replaced & (torch.rand(ids.shape, device=ids.device) < 0.5)
        masked = torch.where(replaced, b["mask_token_id"], ids)
        masked = torch.where(randomised, torch.randint_like(ids, b["vocab_size"]), masked)
        return masked, labels

    def forward(self, image, ids, mask):
        alpha, bs = self.model["alpha"], image.size(0)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        self.momentum_update()
        bert, bert_m = self.text_encoder, self.text_encoder_m

        image_embeds = self.visual_encoder(image)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_embeds = bert.text(ids, mask)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        # Contrastive loss against momentum features and the queues, momentum-distilled targets.
        with torch.no_grad():
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(bert_m.text(ids, mask)[:, 0]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue], 1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue], 1)
            sim_i2t_m = (image_feat_m @ text_feat_all).float() / self.temp
            sim_t2i_m = (text_feat_m @ image_feat_all).float() / self.temp
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets.fill_diagonal_(1)
            targets_i2t = alpha * sim_i2t_m.softmax(1) + (1 - alpha) * sim_targets
            targets_t2i = alpha * sim_t2i_m.softmax(1) + (1 - alpha) * sim_targets
        sim_i2t = (image_feat @ text_feat_all).float() / self.temp
        sim_t2i = (text_feat @ image_feat_all).float() / self.temp
        loss_i2t = -(F.log_softmax(sim_i2t, 1) * targets_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, 1) * targets_t2i).sum(1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2
        # The queues take this step's momentum features here, in the forward, as the reference does.
        self.enqueue(image_feat_m, text_feat_m)

        # Image-text matching: positives, plus one hard negative per image and per text.
        output_pos = bert.fusion(text_embeds, mask, image_embeds)
        with torch.no_grad():
            weights_i2t = F.softmax(sim_i2t[:, :bs], 1) + 1e-4
            weights_i2t.fill_diagonal_(0)
            weights_t2i = F.softmax(sim_t2i[:, :bs], 1) + 1e-4
            weights_t2i.fill_diagonal_(0)
        image_neg = self.negatives(weights_t2i)  # a negative image for each text
        text_neg = self.negatives(weights_i2t)  # a negative text for each image
        text_all = torch.cat([text_embeds, text_embeds[text_neg]])
        mask_all = torch.cat([mask, mask[text_neg]])
        image_all = torch.cat([image_embeds[image_neg], image_embeds])
        output_neg = bert.fusion(text_all, mask_all, image_all)
        itm_logits = self.itm_head(torch.cat([output_pos[:, 0], output_neg[:, 0]])).float()
        itm_labels = (torch.arange(3 * bs, device=image.device) < bs).long()  # positives first
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # Masked language modelling, distilled from the momentum model.
        masked_ids, labels = self.mask_tokens(ids)
        with torch.no_grad():
            soft_labels = F.softmax(bert_m.mlm_logits(masked_ids, mask, image_embeds_m).float(), -1)
        logits = bert.mlm_logits(masked_ids, mask, image_embeds).float()
        loss_ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        chosen = (labels != -100).float()
        distill = -(F.log_softmax(logits, -1) * soft_labels).sum(-1)
        loss_mlm = (1 - alpha) * loss_ce + alpha * (distill * chosen).sum() / chosen.sum()
        self.last_losses = (loss_ita.detach(), loss_itm.detach(), loss_mlm.detach())
        return loss_ita + loss_itm + loss_mlm


def trainable_elements(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)  # tied decoder once


def by_module(named_parameters):
    """Parameter elements per top-level module name."""
    counts = {}
    for name, p in named_parameters:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + p.numel()
    return counts


def check_params(model_cfg):
    from reference_albef import is_pretraining_only, reference_module

    with torch.device("meta"):
        model = Albef(model_cfg, best=False)
    ours = by_module((n, p) for n, p in model.named_parameters() if p.requires_grad)
    # named_parameters lists the tied decoder weight once and no buffers (position_ids).
    theirs = by_module((n, p) for n, p in reference_module(model_cfg).named_parameters() if not is_pretraining_only(n))
    print(f"{'module':<16}{'ours':>14}{'reference':>14}")
    for top in sorted(set(ours) | set(theirs)):
        print(f"{top:<16}{ours.get(top, 0):>14,}{theirs.get(top, 0):>14,}")
    total = trainable_elements(model)
    print(f"{'total':<16}{total:>14,}{sum(theirs.values()):>14,}")
    if ours != theirs or total != sum(theirs.values()):
        sys.exit(f"{model_cfg['preset']}: trainable parameter counts differ from the reference layout")
    print(f"{model_cfg['preset']}: {total:,} trainable parameters, as the reference layout")


def adamw(model, opt, fused):
    # timm's add_weight_decay: 1-D parameters (every bias, every LayerNorm) get no decay; the
    # 0-D temp and every matrix, conv kernel and embedding do.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim != 1], "weight_decay": opt["weight_decay"]},
              {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                             fused=True if fused else None)


def make_batch(model_cfg, batch, text_len, device):
    """One fixed batch on the device, reused by every step."""
    b, res = model_cfg["bert"], model_cfg["image_res"]
    image = torch.randn(batch, 3, res, res, device=device)
    ids = torch.randint(5, b["vocab_size"], (batch, text_len), device=device)
    ids[:, 0] = b["cls_token_id"]
    real = torch.randint(min(3, text_len), text_len + 1, (batch, 1), device=device)
    ids = torch.where(torch.arange(text_len, device=device) < real, ids, b["pad_token_id"])
    return image, ids, ids != b["pad_token_id"]


def matmul_peak_tflops(device):
    """TF/s of a square matmul: bf16 8192 on CUDA (20 back to back), fp32 2048 on the CPU (the
    fastest of 6, so that a busy moment of the machine does not lower the peak)."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (2048, torch.float32, 6)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3 if cuda else 1):
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            seconds = min(seconds, time.perf_counter() - t0)
        reps = 1
    return 2 * n ** 3 * reps / seconds / 1e12


def datasheet_peak_tflops(device):
    """Dense bf16 TF/s from the datasheet (SXM parts), where known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name or "H100" in name:
        return 989.4
    return 312.0 if "A100" in name else None


class Clock:
    """Phase boundaries of one step: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, cuda):
        self.cuda, self.marks = cuda, []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def phases(self):
        """Seconds between consecutive marks; waits for the device."""
        marks, self.marks = self.marks, []
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]


def train_step(model, opt, batch, autocast, clock):
    """One step; returns (loss, wall seconds, [forward, backward, optimizer] seconds)."""
    t0 = time.perf_counter()
    clock.mark()
    with autocast:
        loss = model(*batch)
    clock.mark()
    loss.backward()
    clock.mark()
    opt.step()
    opt.zero_grad(set_to_none=True)
    clock.mark()
    phases = clock.phases()
    loss = loss.item()
    if not math.isfinite(loss):
        sys.exit(f"non-finite loss {loss}")
    return loss, time.perf_counter() - t0, phases


def summary(values):
    t = torch.tensor(values, dtype=torch.float64)
    return {"p50": t.quantile(0.5).item(), "p90": t.quantile(0.9).item(), "mean": t.mean().item(),
            "min": t.min().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON printed by `albef config`")
    parser.add_argument("--mode", choices=["reference", "best"], default="reference")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 leaves torch's default")
    parser.add_argument("--json", help="write the result object here")
    parser.add_argument("--check-params", action="store_true", help="compare parameter counts with the reference")
    args = parser.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    model_cfg = config["model"]
    if args.check_params:
        check_params(model_cfg)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device, best = torch.device(args.device), args.mode == "best"
    cuda = device.type == "cuda"
    if cuda and best:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and best else contextlib.nullcontext()

    measured_peak = matmul_peak_tflops(device)
    torch.manual_seed(config["train"]["seed"])
    with torch.device(device):
        model = Albef(model_cfg, best)
    opt = adamw(model, config["optimizer"], fused=best)
    text_len = config["data"]["max_tokens"]
    batch = make_batch(model_cfg, args.batch, text_len, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    clock = Clock(cuda)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        train_step(model, opt, batch, autocast, clock)  # the first warm-up step, or one extra
    flops = counter.get_total_flops()
    for _ in range(args.warmup - 1):
        train_step(model, opt, batch, autocast, clock)
    losses, steps, phases = [], [], []
    for _ in range(args.steps):
        loss, seconds, phase = train_step(model, opt, batch, autocast, clock)
        losses.append(loss)
        steps.append(seconds)
        phases.append(phase)

    step = summary(steps)
    forward, backward, optimizer = (summary([p[i] for p in phases])["p50"] for i in range(3))
    achieved = flops / step["p50"] / 1e12
    datasheet = datasheet_peak_tflops(device)
    result = {
        "implementation": f"torch-{args.mode}",
        "preset": model_cfg["preset"],
        "device": device.type,
        "threads": torch.get_num_threads(),
        "world": 1,
        "batch": args.batch, "text_len": text_len, "image_res": model_cfg["image_res"],
        "steps": args.steps, "warmup": args.warmup,
        "parameters": trainable_elements(model),
        "flops_per_step": flops,
        "step_seconds": step,
        "images_per_second": args.batch / step["p50"],
        "phases_seconds": {"forward": forward, "backward": backward, "communication": 0.0, "optimizer": optimizer},
        "achieved_tflops": achieved,
        "mfu": {"datasheet_peak_tflops": datasheet, "datasheet": achieved / datasheet if datasheet else None,
                "measured_peak_tflops": measured_peak, "measured": achieved / measured_peak},
        "peak_memory_bytes": {
            "cuda_allocated": torch.cuda.max_memory_allocated(device) if cuda else None,
            "cuda_reserved": torch.cuda.max_memory_reserved(device) if cuda else None,
            "host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        "losses": losses,
    }

    rows = [("implementation", result["implementation"]), ("preset", result["preset"]),
            ("device / threads", f"{device.type} / {result['threads']}"),
            ("batch x text_len, res", f"{args.batch} x {text_len}, {model_cfg['image_res']}"),
            ("parameters", f"{result['parameters']:,}"), ("GFLOP / step", f"{flops / 1e9:.3f}"),
            ("step p50 / p90 / min", f"{step['p50'] * 1e3:.1f} / {step['p90'] * 1e3:.1f} / {step['min'] * 1e3:.1f} ms"),
            ("fwd / bwd / opt p50", f"{forward * 1e3:.1f} / {backward * 1e3:.1f} / {optimizer * 1e3:.1f} ms"),
            ("images / s", f"{result['images_per_second']:.1f}"),
            ("achieved TF/s", f"{achieved:.4f} (measured peak {measured_peak:.3f}, MFU {achieved / measured_peak:.1%})"),
            ("losses", f"{losses[0]:.4f} .. {losses[-1]:.4f}" if losses else "-")]
    if datasheet:
        rows.append(("datasheet MFU", f"{achieved / datasheet:.1%} of {datasheet} TF/s"))
    for key, value in rows:
        print(f"{key:<24}{value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
