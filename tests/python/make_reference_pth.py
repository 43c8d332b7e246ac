"""Reference ALBEF checkpoints as the authors' scripts save them, written by PyTorch's own
`torch.save`, for the Rust `.pth` reader (crates/albef-model/tests/pth.rs).

    make_reference_pth.py MODEL_JSON SAVED_RES OUTDIR

MODEL_JSON is our model configuration (the test's); the checkpoints are of that model at
SAVED_RES pixels (the reference's 256 px pretraining) while the test loads them at the
configuration's image_res (its 384 px fine-tuning). Writes to OUTDIR:

- pretrained.pth: {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'} as Pretrain.py saves
  them (ALBEF_4M.pth's layout): online and momentum encoders that differ, queues, queue_ptr;
- finetuned.pth: a fine-tuned model's state (Retrieval.py's layout): the text encoder a bare
  BertModel (`text_encoder.embeddings.*`, no `bert.`, no MLM head), no momentum encoders, no queues;
- expected.safetensors: the pretrained state under the reference names with both position
  embeddings interpolated to image_res as the reference's `interpolate_pos_embed` does;
- evil.pth: a torch.save-shaped archive whose pickle calls os.system (it would create MARKER);
- truncated.pth (half of pretrained.pth) and not_a_zip.pth.
"""
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reference_albef import ReferenceAlbef


def interpolate_pos_embed(pos_embed, num_patches):
    """The reference's models/vit.py interpolate_pos_embed: the class token kept, the patch grid
    resized bicubically (align_corners=False)."""
    dim = pos_embed.shape[-1]
    extra = pos_embed.shape[-2] - int((pos_embed.shape[-2] - 1) ** 0.5) ** 2
    orig = int((pos_embed.shape[-2] - extra) ** 0.5)
    new = int(num_patches ** 0.5)
    if orig == new:
        return pos_embed
    tokens = pos_embed[:, :extra]
    grid = pos_embed[:, extra:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat((tokens, grid.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def main():
    model_cfg = json.loads(Path(sys.argv[1]).read_text())
    saved_res, out = int(sys.argv[2]), Path(sys.argv[3])
    load_res = model_cfg["image_res"]
    torch.manual_seed(7)
    module = ReferenceAlbef({**model_cfg, "image_res": saved_res})
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))  # no parameter left at its init value
        module.queue_ptr.fill_(5)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    momentum = [k for k in state if k.split(".")[0].endswith("_m")]
    assert any(not state[k].equal(state[k.replace("_m.", ".", 1)]) for k in momentum)

    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4), "exp_avg_sq": torch.rand(4)}},
                 "param_groups": [{"lr": 1e-4, "weight_decay": 0.02, "params": [0]}]}
    config = {"image_res": saved_res, "queue_size": model_cfg["queue_size"], "bert_config": "configs/config_bert.json"}
    torch.save({"model": state, "optimizer": optimizer, "lr_scheduler": {"last_epoch": 29}, "config": config,
                "epoch": 29}, out / "pretrained.pth")

    patches = (load_res // model_cfg["vision"]["patch_size"]) ** 2
    expected = dict(state)
    for k in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        expected[k] = interpolate_pos_embed(state[k], patches).contiguous()
    # Tied weights share storage, which save_file refuses.
    save_file({k: v.clone().contiguous() for k, v in expected.items()}, out / "expected.safetensors")

    finetuned = {}
    for k, v in state.items():
        root = k.split(".")[0]
        if root.endswith("_m") or root in ("image_queue", "text_queue", "queue_ptr") or ".cls." in k:
            continue
        finetuned[k.replace("text_encoder.bert.", "text_encoder.")] = v
    torch.save({"model": finetuned, "epoch": 5}, out / "finetuned.pth")

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model": Evil(out / "MARKER")}, protocol=2))
        z.writestr("archive/version", "3\n")
    (out / "evil.pth").write_bytes(buf.getvalue())

    whole = (out / "pretrained.pth").read_bytes()
    (out / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    (out / "not_a_zip.pth").write_bytes(b"\x80\x02}q\x00." + bytes(range(256)))


if __name__ == "__main__":
    main()
