"""ALBEF pretraining steps in an independent PyTorch loop, against the Rust trainer's, for
crates/albef-train/tests/train.rs.

    reference_training.py DIR

The model is torch_step.py's eager ALBEF (written from the reference's models/model_pretrain.py
and models/xbert.py, no code of ours); the loop is the reference's Pretrain.py: each step runs
the forward (the EMA of the momentum weights opens it, the queues take the step's momentum
features after the contrastive loss), the backward, then torch.optim.AdamW with timm's parameter
groups (no weight decay for 1-D parameters and biases). The random draws (the ITM hard negatives,
the MLM masking) are injected: the ones the Rust trainer drew.

DIR holds what the Rust test wrote: config.json (the job configuration), steps.json (each step's
learning rate and alpha, and the Rust losses), step-K/ (the Rust checkpoint after K steps:
model.safetensors and optimizer.safetensors under the reference's names), inputs-K and grads-K
(the batch and draws of step K+1, the Rust gradients). This script checks, within 1e-5:
1. each step resumed here from the trainer's checkpoint before it: the losses, every gradient
   and the state after it as the trainer's;
2. three steps in a row from step 0: the losses and the state after each as the trainer's;
and writes its own state after step 2 to DIR/python-step-2/ for the Rust side to resume.
"""
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from torch_step import Albef

TOLERANCE = 1e-5


def module_name(name):
    """torch_step's name of a reference state-dict entry; None for what it does not hold (the
    BERT position ids, the tied decoder alias, the queue pointer, which it keeps on the host)."""
    if name.endswith("position_ids") or ".cls.predictions.decoder." in name or name == "queue_ptr":
        return None
    rules = [
        (r"\.patch_embed\.proj\.", ".patch_embed."),
        (r"\.attn\.(qkv|proj)\.", r".\1."),
        (r"\.mlp\.(fc1|fc2)\.", r".\1."),
        (r"\.bert\.embeddings\.LayerNorm\.", ".embed_norm."),
        (r"\.bert\.embeddings\.", "."),
        (r"\.bert\.encoder\.layer\.", ".layer."),
        (r"\.(attention|crossattention)\.self\.", r".\1."),
        (r"\.(attention|crossattention)\.output\.dense\.", r".\1.dense."),
        (r"\.(attention|crossattention)\.output\.LayerNorm\.", r".\1.norm."),
        (r"\.intermediate\.dense\.", ".intermediate."),
        (r"\.output\.dense\.", ".output."),
        (r"\.output\.LayerNorm\.", ".norm."),
        (r"\.cls\.predictions\.transform\.dense\.", ".transform."),
        (r"\.cls\.predictions\.transform\.LayerNorm\.", ".transform_norm."),
        (r"\.cls\.predictions\.bias$", ".decoder_bias"),
    ]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


@torch.no_grad()
def momentum_update(model_pairs, m):
    """The reference's _momentum_update: every momentum parameter moved toward its online one."""
    for model_pair in model_pairs:
        for param, param_m in zip(model_pair[0].parameters(), model_pair[1].parameters()):
            param_m.data = param_m.data * m + param.data * (1.0 - m)


def load_state(module, model_file):
    """Loads a reference state file into `module`, which must hold exactly its tensors; returns
    the file's state and the module's names -> the file's."""
    state = load_file(model_file)
    names = {module_name(k): k for k in state if module_name(k) is not None}
    own = module.state_dict()
    assert set(names) == set(own), sorted(set(names) ^ set(own))[:10]
    module.load_state_dict({k: state[names[k]] for k in own}, strict=True)
    return state, names


def build(cfg, model_file):
    """The module with a reference state file's values; its names -> the file's."""
    module = Albef(cfg["model"], best=False).train()
    state, names = load_state(module, model_file)
    module.queue_ptr = int(state["queue_ptr"].item())
    return module, names


def optimizer(cfg, module):
    """timm's create_optimizer as the reference calls it: AdamW, no decay for 1-D and biases."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    o = cfg["optimizer"]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])


def load_optimizer(opt, module, names, file):
    state = load_file(file)
    for name, p in module.named_parameters():
        if p.requires_grad:
            ref = names[name]
            opt.state[p] = {"step": state[f"{ref}.step"].clone(), "exp_avg": state[f"{ref}.exp_avg"].clone(),
                            "exp_avg_sq": state[f"{ref}.exp_avg_sq"].clone()}


def save(module, opt, names, directory):
    directory.mkdir(exist_ok=True)
    model = {names[k]: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    model["queue_ptr"] = torch.tensor([module.queue_ptr], dtype=torch.long)
    save_file(model, directory / "model.safetensors")
    state = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            s = opt.state[p]
            for key in ("step", "exp_avg", "exp_avg_sq"):
                state[f"{names[name]}.{key}"] = s[key].detach().clone().contiguous()
    save_file(state, directory / "optimizer.safetensors")


def step(module, opt, directory, k, lr, alpha):
    """One step of the reference loop with step k's batch and the Rust draws."""
    inputs = load_file(directory / f"inputs-{k}.safetensors")
    negatives = [inputs["image_negatives"], inputs["text_negatives"]]  # images for texts first
    module.negatives = lambda weights: negatives.pop(0)
    module.mask_tokens = lambda ids: (inputs["masked_ids"], inputs["mlm_labels"])
    module.model["alpha"] = alpha
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = module(inputs["image"], inputs["input_ids"], inputs["attention_mask"])
    loss.backward()
    assert not negatives, "both negatives were drawn"
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    opt.step()
    return module.last_losses, grads


def without_key_bias(name, t):
    """`t` less the attention key biases. Their gradient is zero in exact arithmetic (a bias on
    the keys shifts every score of a query alike, and the softmax cancels it); what remains is
    rounding noise, which AdamW's normalisation turns into steps of the learning rate's size in
    either implementation, so their values are not compared (their gradients are)."""
    if name.endswith(".key.bias"):
        return t[:0]
    if name.endswith(".qkv.bias"):
        q, _, v = t.chunk(3)
        return torch.cat([q, v])
    return t


def compare_gradients(what, ours, theirs, names):
    """Each gradient within TOLERANCE of the trainer's, relative to the larger of 1 and its
    largest element (a gradient that is zero in exact arithmetic, as the key biases', is noise
    on both sides and compares absolutely)."""
    worst = (0.0, None)
    for k, g in ours.items():
        ref = theirs[names[k]]
        d = ((g - ref).abs().max() / max(1.0, ref.abs().max().item())).item()
        if d > worst[0]:
            worst = (d, k)
    assert worst[0] <= TOLERANCE, f"{what}: {worst[1]} differs by {worst[0]:.2e}"
    return worst


def compare(what, ours, theirs, names, key_biases=True):
    """The tensors as one vector within TOLERANCE (relative L2), as the trainer's own
    equivalence tests compare states: element by element, a gradient element near AdamW's eps
    turns rounding noise into a visible step (the state's attention key biases aside: see
    without_key_bias). Returns the relative L2 and the largest element difference."""
    diff, norm, worst = 0.0, 0.0, (0.0, None)
    for k, v in ours.items():
        ref = theirs[names[k]].to(v.dtype)
        if not key_biases:
            v, ref = without_key_bias(k, v), without_key_bias(k, ref)
        if v.numel() == 0 or not v.is_floating_point():
            continue
        d = (v.double() - ref.double())
        diff, norm = diff + d.square().sum().item(), norm + ref.double().square().sum().item()
        if d.abs().max().item() > worst[0]:
            worst = (d.abs().max().item(), k)
    relative = (diff / norm) ** 0.5
    assert relative <= TOLERANCE, f"{what}: relative L2 {relative:.2e}; largest: {worst[1]} by {worst[0]:.2e}"
    return relative, worst


def state_of(module):
    return {k: v for k, v in module.state_dict().items()}


def from_checkpoint(cfg, directory):
    module, names = build(cfg, directory / "model.safetensors")
    opt = optimizer(cfg, module)
    load_optimizer(opt, module, names, directory / "optimizer.safetensors")
    return module, opt, names


def check_losses(k, losses, rust):
    for name, mine in zip(("ita", "itm", "mlm"), losses):
        theirs = rust[name]
        assert abs(mine.item() - theirs) <= TOLERANCE * max(1.0, abs(theirs)), f"step {k + 1} {name}: {mine} vs {theirs}"


def check_resumed_steps(directory, build, forward, what, after_step=lambda module, after: ""):
    """Each step of `directory` (as crates/albef-train/tests/train.rs writes it), resumed here from
    the trainer's checkpoint before it: `build(cfg, model_file)` makes the module and its names,
    `forward(module, inputs, step)` runs it on the step's inputs and returns the loss to minimise
    and the losses to compare by name. The losses, every gradient and the state after the step
    must be the trainer's within TOLERANCE; `after_step(module, state_after)` checks more and
    says what."""
    cfg = json.loads((directory / "config.json").read_text())
    steps = json.loads((directory / "steps.json").read_text())
    for k, s in enumerate(steps):
        module, names = build(cfg, directory / f"step-{k}" / "model.safetensors")
        opt = optimizer(cfg, module)
        load_optimizer(opt, module, names, directory / f"step-{k}" / "optimizer.safetensors")
        for g in opt.param_groups:
            g["lr"] = s["lr"]
        opt.zero_grad(set_to_none=True)
        loss, losses = forward(module, load_file(directory / f"inputs-{k}.safetensors"), s)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        opt.step()
        for name, mine in losses.items():
            theirs = s[name]
            assert abs(mine - theirs) <= TOLERANCE * max(1.0, abs(theirs)), f"step {k + 1} {name}: {mine} vs {theirs}"
        g, g_where = compare_gradients(f"step {k + 1} gradients", grads,
                                       load_file(directory / f"grads-{k}.safetensors"), names)
        after = load_file(directory / f"step-{k + 1}" / "model.safetensors")
        w, (largest, where) = compare(f"step {k + 1} state", state_of(module), after, names, key_biases=False)
        more = after_step(module, after)
        shown = " ".join(f"{n} {v:.4f}" for n, v in losses.items())
        print(f"{what} step {k + 1} (alpha {s['alpha']:.2f}): {shown} as the trainer's; gradients within {g:.1e} "
              f"({g_where}); state within {w:.1e} (relative L2; largest element {where} by {largest:.1e}){more}")


def main():
    d = Path(sys.argv[1])
    cfg = json.loads((d / "config.json").read_text())
    steps = json.loads((d / "steps.json").read_text())

    # Each step from the trainer's checkpoint before it (resumed here): the same losses,
    # gradients and state after it.
    for k, s in enumerate(steps):
        module, opt, names = from_checkpoint(cfg, d / f"step-{k}")
        losses, grads = step(module, opt, d, k, s["lr"], s["alpha"])
        check_losses(k, losses, s)
        g, g_where = compare_gradients(f"step {k + 1} gradients", grads, load_file(d / f"grads-{k}.safetensors"),
                                       names)
        after = load_file(d / f"step-{k + 1}" / "model.safetensors")
        w, (largest, where) = compare(f"step {k + 1} state", state_of(module), after, names, key_biases=False)
        assert module.queue_ptr == after["queue_ptr"].item(), (module.queue_ptr, after["queue_ptr"])
        print(f"step {k + 1} from the trainer's checkpoint of step {k}: losses as the trainer's; gradients within "
              f"{g:.1e} ({g_where}); state within {w:.1e} (relative L2; largest element {where} by {largest:.1e})")

    # Three steps in a row from step 0: the state after each as the trainer's.
    module, opt, names = from_checkpoint(cfg, d / "step-0")
    for k, s in enumerate(steps):
        losses, _ = step(module, opt, d, k, s["lr"], s["alpha"])
        check_losses(k, losses, s)
        after = load_file(d / f"step-{k + 1}" / "model.safetensors")
        w, _ = compare(f"step {k + 1} of the loop", state_of(module), after, names, key_biases=False)
        print(f"step {k + 1} of an uninterrupted loop: state within {w:.1e} of the trainer's")
        if k + 1 == 2:
            save(module, opt, names, d / "python-step-2")


if __name__ == "__main__":
    main()
