#!/usr/bin/env python3
"""Writes TorchScript placement policies and what PyTorch computes with them, for the
`torch` feature's test (scripts/test-torch-feature runs this, then the Rust test).

Usage: torch-policy-fixtures.py OUT_DIR

`FerryPolicy` is also the pattern for exporting a policy trained in Python (e.g. the TMO
authors' Stable-Baselines3 A2C/PPO): wrap the actor so that `forward(obs)` maps a float32
[N, 25] (plain) or [N, 27] (rc) observation to [N, 9] action logits, add `ferry_meta()`, then
`torch.jit.script(...)` and `torch.jit.save(...)`. For an SB3 `ActorCriticPolicy` the actor is
`nn.Sequential(policy.mlp_extractor.policy_net, policy.action_net)`.

Besides the TorchScript files this writes a ferry safetensors policy with the same actor weights
(`ferry policy train`'s format), so the Rust test can check that both serve the same
probabilities on live observations, masks included.
"""

import json
import os
import struct
import sys

import torch
from torch import nn

ACTIONS = 9
OBS = {"plain": 25, "rc": 27}
HIDDEN = [64, 64]


def mlp(sizes):
    """SB3's MlpExtractor + head: Linear/Tanh ..., last layer linear."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class FerryPolicy(nn.Module):
    """What ferry loads: forward(obs [N, obs]) -> [N, 9]; ferry_meta() -> JSON string."""

    meta: str

    def __init__(self, actor: nn.Module, meta: dict, probabilities: bool = False):
        super().__init__()
        self.actor = actor
        self.meta = json.dumps(meta)
        self.probabilities = probabilities

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        z = self.actor(obs)
        if self.probabilities:
            return torch.softmax(z, dim=-1)
        return z

    @torch.jit.export
    def ferry_meta(self) -> str:
        return self.meta


class NoMeta(nn.Module):
    def __init__(self, actor):
        super().__init__()
        self.actor = actor

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)


def meta(variant, **extra):
    m = {
        "variant": variant,
        "algorithm": "a2c",
        "device": "jetson-tx2",
        "network": "wired",
        "tasks": ["A", "B"],
        "latency_budget_s": 30.0,
        "usd_budget": 0.05,
        "latency_scale_s": 35.0,
        "usd_scale": 0.07,
        "hidden": HIDDEN,
    }
    m.update(extra)
    return m


def write_safetensors(path, actor, critic, m):
    """ferry policy train's file: actor.{i}/critic.{i} weights and biases, metadata header."""
    header_meta = {
        "format": "ferry-tmo-policy",
        "version": "1",
        "algorithm": m["algorithm"],
        "variant": m["variant"],
        "obs_size": str(OBS[m["variant"]]),
        "actions": str(ACTIONS),
        "views": "3",
        "history": "5",
        "hidden": ",".join(str(h) for h in HIDDEN),
        "device": m["device"],
        "network": m["network"],
        "latency_budget_s": str(m["latency_budget_s"]),
        "usd_budget": str(m["usd_budget"]),
        "latency_scale_s": str(m["latency_scale_s"]),
        "usd_scale": str(m["usd_scale"]),
        "tasks": json.dumps(m["tasks"]),
        "seed": "0",
        "steps": "0",
        "test_dialogues": "",
    }
    tensors = []
    for name, net in [("actor", actor), ("critic", critic)]:
        linears = [l for l in net if isinstance(l, nn.Linear)]
        for i, l in enumerate(linears):
            tensors.append((f"{name}.{i}.weight", l.weight.detach().contiguous()))
            tensors.append((f"{name}.{i}.bias", l.bias.detach().contiguous()))
    header = {"__metadata__": header_meta}
    blobs, off = [], 0
    for k, t in tensors:
        b = struct.pack(f"<{t.numel()}f", *t.flatten().tolist())
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def masked(out, mask, probabilities):
    """What ferry serves: softmax of the logits (or renormalised probabilities) over allowed
    actions, in float64."""
    out = out.double()
    allowed = torch.tensor(mask)
    if probabilities:
        p = torch.where(allowed, out.clamp(min=0), torch.zeros_like(out))
        return p / p.sum()
    z = torch.where(allowed, out, torch.full_like(out, float("-inf")))
    return torch.softmax(z, dim=-1)


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(11)
    fixture = {"torch_version": torch.__version__, "policies": [], "samples": [], "refused": []}
    for variant in ["plain", "rc"]:
        n = OBS[variant]
        actor = mlp([n] + HIDDEN + [ACTIONS])
        # Larger weights than nn.Linear's default so that the probabilities are far from uniform.
        with torch.no_grad():
            for l in actor:
                if isinstance(l, nn.Linear):
                    l.weight.mul_(3.0)
        critic = mlp([n] + HIDDEN + [1])
        st = f"{variant}.safetensors"
        write_safetensors(os.path.join(out_dir, st), actor, critic, meta(variant))
        for output in ["logits", "probabilities"]:
            probs = output == "probabilities"
            m = meta(variant, output=output, obs_size=n, actions=ACTIONS, sb3="example")
            module = torch.jit.script(FerryPolicy(actor, m, probabilities=probs))
            name = f"{variant}_{output}.pt"
            torch.jit.save(module, os.path.join(out_dir, name))
            loaded = torch.jit.load(os.path.join(out_dir, name))
            fixture["policies"].append({"safetensors": st, "torchscript": name, "output": output})
            for k in range(12):
                # Observation-like inputs: history in {-1, 0, 1}, tasks 0/1, budgets in [0, 1].
                x = torch.randint(-1, 2, (n,), generator=gen).float()
                if variant == "rc":
                    x[25:] = torch.rand(2, generator=gen)
                mask = [True] * ACTIONS
                if k % 3 == 1:
                    mask = [i < 1 + (k % 5) for i in range(ACTIONS)]
                elif k % 3 == 2:
                    mask = [bool(torch.rand(1, generator=gen) < 0.5) or i == 0 for i in range(ACTIONS)]
                with torch.no_grad():
                    y = loaded(x.unsqueeze(0))[0]
                fixture["samples"].append(
                    {
                        "module": name,
                        "features": x.tolist(),
                        "mask": mask,
                        "out": y.tolist(),
                        "probabilities": masked(y, mask, probs).tolist(),
                    }
                )
    # Modules that must be refused, with a word of the reason.
    wrong_obs = torch.jit.script(FerryPolicy(mlp([25] + HIDDEN + [ACTIONS]), meta("rc")))
    torch.jit.save(wrong_obs, os.path.join(out_dir, "wrong_obs.pt"))
    fixture["refused"].append({"module": "wrong_obs.pt", "error": "[1, 27]"})
    wrong_actions = torch.jit.script(FerryPolicy(mlp([27] + HIDDEN + [8]), meta("rc")))
    torch.jit.save(wrong_actions, os.path.join(out_dir, "wrong_actions.pt"))
    fixture["refused"].append({"module": "wrong_actions.pt", "error": "output shape [1, 8]"})
    no_meta = torch.jit.script(NoMeta(mlp([27] + HIDDEN + [ACTIONS])))
    torch.jit.save(no_meta, os.path.join(out_dir, "no_meta.pt"))
    fixture["refused"].append({"module": "no_meta.pt", "error": "ferry_meta"})
    bad_meta = torch.jit.script(FerryPolicy(mlp([27] + HIDDEN + [ACTIONS]), meta("rc", device="jetson-tx9")))
    torch.jit.save(bad_meta, os.path.join(out_dir, "bad_device.pt"))
    fixture["refused"].append({"module": "bad_device.pt", "error": "unknown device"})
    with open(os.path.join(out_dir, "not_torchscript.pt"), "wb") as f:
        f.write(b"not a zip archive")
    fixture["refused"].append({"module": "not_torchscript.pt", "error": "not a TorchScript module"})
    with open(os.path.join(out_dir, "fixture.json"), "w") as f:
        json.dump(fixture, f, indent=1)
    print(f"wrote {len(fixture['samples'])} samples, {len(fixture['refused'])} refused modules to {out_dir}")


if __name__ == "__main__":
    main()
