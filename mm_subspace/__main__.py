"""``python -m mm_subspace``: a one-minute offline demo of the core API on real data.

A small MLP is pre-trained on half of the digit classes of scikit-learn's bundled digits set (1,797
real 8×8 scans), frozen, then adapted to all ten classes with LoRA, MoSLoRA and TS-Mixing at the same
rank. Each adapter is saved, reloaded bit-exactly, merged, and exported to PEFT's format; the table
shows accuracy and trainable parameters. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import mm_subspace as mms


def _data(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, desc: str) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if mms.list_adapters(model):
            loss = loss + mms.aux_loss(model)  # SuLoRA balance / MPC terms, zero for the others
        opt.zero_grad()
        loss.backward()
        opt.step()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm_subspace", description=__doc__.splitlines()[1])
    parser.add_argument("--methods", nargs="+", default=["lora", "moslora", "ts_mixing"], help="registered methods to compare")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = _data()
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    half = ytr < 5
    _train(base, xtr[half], ytr[half], args.steps, 1e-2, "pre-train base on digits 0-4")
    rows = [("base (frozen, digits 0-4 only)", _accuracy(base, xte, yte), 0)]
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            model = copy.deepcopy(base)
            mms.inject(model, mms.config_for(method, rank=args.rank, alpha=2 * args.rank, targets=["0", "2", "4"]))
            _train(model, xtr, ytr, args.steps, 5e-3, f"adapt with {method}")
            acc = _accuracy(model, xte, yte)
            folder = Path(tmp) / method
            mms.save_adapter(model, folder)
            reloaded = copy.deepcopy(base)
            mms.load_adapter(reloaded, folder)
            assert _accuracy(reloaded, xte, yte) == acc, "reload must be bit-exact"
            try:
                mms.merge(reloaded)
                mms.export_peft(model, Path(tmp) / f"{method}-peft")
                note = "saved, reloaded, merged, exported to PEFT"
            except mms.MergeError as err:
                note = f"saved, reloaded; not mergeable ({err})"
            rows.append((method, acc, mms.trainable_parameters(model)[0], note))
    print(f"\n{'adapter':34s} {'test acc':>8s} {'trainable':>10s}")
    for row in rows:
        print(f"{row[0]:34s} {row[1]:8.3f} {row[2]:10,d}  {row[3] if len(row) > 3 else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
