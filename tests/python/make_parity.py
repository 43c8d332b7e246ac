"""Reference tensors for the Rust parity test (crates/albef-model/tests/parity.rs).

Usage: python make_parity.py OUTDIR

Builds a small Hugging Face BertForMaskedLM and a small timm ViT (DeiT-B parameter layout) from
configs with random weights -- nothing is downloaded -- and writes their weights, inputs and
outputs as safetensors, plus the dimensions the Rust side needs as JSON.
"""

import json
import os
import sys
from functools import partial
from pathlib import Path

# Never reach the network: the models are built from configs, not fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402


def plain_state_dict(model: nn.Module) -> dict:
    # Tied weights share storage, which save_file refuses: give every key its own copy.
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def perturb_layer_norms(model: nn.Module) -> None:
    # LayerNorms start at weight 1 / bias 0: a norm left at its init on the Rust side would then
    # still match. Move them away from the init so a misloaded norm fails the test.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_bert(out: Path) -> None:
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        pad_token_id=0,
    )
    model = BertForMaskedLM(cfg).eval()
    perturb_layer_norms(model)
    with torch.no_grad():
        # Also the (tied) decoder bias, zero at init.
        model.cls.predictions.bias.add_(0.1 * torch.randn_like(model.cls.predictions.bias))
    save_file(plain_state_dict(model), str(out / "bert.safetensors"))

    batch, length = 3, 12
    input_ids = torch.randint(5, cfg.vocab_size, (batch, length), dtype=torch.int64)
    input_ids[:, 0] = 101  # [CLS]
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    for row, start in [(1, 8), (2, 5)]:
        input_ids[row, start:] = 0  # [PAD]
        attention_mask[row, start:] = 0

    with torch.no_grad():
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask.contiguous(),
            "hidden": hidden.contiguous(),
            "logits": logits.contiguous(),
        },
        str(out / "bert_io.safetensors"),
    )
    keys = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
    ]
    write_json(out / "bert_config.json", {k: getattr(cfg, k) for k in keys})


def make_vit(img_size: int) -> VisionTransformer:
    # DeiT-B/16's layout (deit_base_patch16_224) at a CPU-friendly size.
    return VisionTransformer(
        img_size=img_size,
        patch_size=16,
        embed_dim=96,
        depth=3,
        num_heads=4,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=10,
    ).eval()


def albef_interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    # ALBEF's models/vit.py interpolate_pos_embed: CLS kept, patch grid resized bicubically.
    dim = pos_embed.shape[-1]
    old = int((pos_embed.shape[1] - 1) ** 0.5)
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((cls, patches), dim=1)


def make_vit_parity(out: Path) -> None:
    model = make_vit(64)
    perturb_layer_norms(model)
    with torch.no_grad():
        # timm starts cls_token at zero (and pos_embed small): make both clearly nonzero.
        model.cls_token.copy_(torch.randn_like(model.cls_token))
        model.pos_embed.copy_(torch.randn_like(model.pos_embed))
    state = plain_state_dict(model)
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"}
    expected |= {f"blocks.0.{n}.weight" for n in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]}
    missing = expected - state.keys()
    assert not missing, f"timm ViT lacks DeiT keys {sorted(missing)}"
    save_file(state, str(out / "vit.safetensors"))

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(images)

    pos_embed_96 = albef_interpolate_pos_embed(state["pos_embed"], 96 // 16)
    model_96 = make_vit(96)
    model_96.load_state_dict({**state, "pos_embed": pos_embed_96})
    images_96 = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens_96 = model_96.forward_features(images_96)

    save_file(
        {
            "images": images.contiguous(),
            "tokens": tokens.contiguous(),
            "pos_embed_96": pos_embed_96.contiguous(),
            "images_96": images_96.contiguous(),
            "tokens_96": tokens_96.contiguous(),
        },
        str(out / "vit_io.safetensors"),
    )
    write_json(
        out / "vit_config.json",
        {"patch_size": 16, "embed_dim": 96, "depth": 3, "num_heads": 4, "mlp_dim": 4 * 96, "image_res": 64},
    )


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    make_bert(out)
    make_vit_parity(out)


if __name__ == "__main__":
    main()
