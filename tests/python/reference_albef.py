"""The reference ALBEF pretraining module's state-dict layout, built from independent code: timm's
VisionTransformer for the image encoders and Hugging Face's BertForMaskedLM for the text encoders,
shaped the way the reference `models/model_pretrain.py` and `models/xbert.py` shape them:

- cross-attention only in the layers from `fusion_layer` on, its key/value reading
  `encoder_width`-wide image tokens;
- `embeddings.position_ids` a persistent buffer (the reference BERT registers it with
  `register_buffer("position_ids", torch.arange(max_position_embeddings).expand((1, -1)))`, so
  its checkpoints carry it; current transformers no longer saves it);
- projections, ITM head, temperature, momentum copies and feature queues as the reference names
  them.

Built on the meta device: no memory, no initialisation cost, even for the base preset."""
import functools
import logging

import timm
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

logging.getLogger("transformers").setLevel(logging.ERROR)

PRETRAINING_ONLY = ("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m", "image_queue",
                    "text_queue", "queue_ptr")


def vision_encoder(model: dict) -> nn.Module:
    v = model["vision"]
    return timm.models.vision_transformer.VisionTransformer(
        img_size=model["image_res"], patch_size=v["patch_size"], embed_dim=v["vision_width"], depth=v["depth"],
        num_heads=v["num_heads"], mlp_ratio=v["mlp_dim"] / v["vision_width"], qkv_bias=True, num_classes=0,
        norm_layer=functools.partial(nn.LayerNorm, eps=v["layer_norm_eps"]))


def text_encoder(model: dict) -> nn.Module:
    b = model["bert"]
    config = BertConfig(
        vocab_size=b["vocab_size"], hidden_size=b["hidden_size"], num_hidden_layers=b["num_hidden_layers"],
        num_attention_heads=b["num_attention_heads"], intermediate_size=b["intermediate_size"],
        max_position_embeddings=b["max_position_embeddings"], type_vocab_size=b["type_vocab_size"],
        layer_norm_eps=b["layer_norm_eps"], pad_token_id=b["pad_token_id"], is_decoder=True, add_cross_attention=True)
    mlm = BertForMaskedLM(config)
    for i, layer in enumerate(mlm.bert.encoder.layer):
        if i < b["fusion_layer"]:
            del layer.crossattention
        else:
            attn = layer.crossattention.self
            attn.key = nn.Linear(b["encoder_width"], attn.key.out_features)
            attn.value = nn.Linear(b["encoder_width"], attn.value.out_features)
    embeddings = mlm.bert.embeddings
    positions = torch.arange(b["max_position_embeddings"]).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=True)
    return mlm


class ReferenceAlbef(nn.Module):
    def __init__(self, model: dict):
        super().__init__()
        width, text_width, embed = model["vision"]["vision_width"], model["bert"]["hidden_size"], model["embed_dim"]
        self.visual_encoder = vision_encoder(model)
        self.text_encoder = text_encoder(model)
        self.vision_proj = nn.Linear(width, embed)
        self.text_proj = nn.Linear(text_width, embed)
        self.temp = nn.Parameter(torch.ones([]) * model["temp"])
        self.itm_head = nn.Linear(text_width, 2)
        self.visual_encoder_m = vision_encoder(model)
        self.vision_proj_m = nn.Linear(width, embed)
        self.text_encoder_m = text_encoder(model)
        self.text_proj_m = nn.Linear(text_width, embed)
        self.register_buffer("image_queue", torch.randn(embed, model["queue_size"]))
        self.register_buffer("text_queue", torch.randn(embed, model["queue_size"]))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def reference_module(model: dict) -> nn.Module:
    with torch.device("meta"):
        return ReferenceAlbef(model)


def is_pretraining_only(name: str) -> bool:
    return name.split(".")[0] in PRETRAINING_ONLY
