"""Run with ``torchrun --nproc_per_node 2``: shard a tiny LLaVA with adapters by torch's FSDP2
(``fully_shard``) on CPU/gloo, train one step, gather the full state dict, and save the adapter from an
unsharded copy — the save path a sharded run needs. Rank 0 prints the adapter digest and the sharded
run's loss; the test compares them with an unsharded run of the same step."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def build(seed: int = 0):
    import mm_subspace as mms
    from mm_subspace.tiny_models import tiny_llava

    model, _ = tiny_llava(pretrained=False)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    mms.inject(model, mms.config_for("moslora", rank=4, alpha=8, init_weights=False,
                                     targets=r".*language_model\..*\.(q_proj|v_proj|up_proj)"))
    return model


def step(model, params):
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad
    return loss.detach()


def main(out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    import mm_subspace as mms
    from mm_subspace.training_utils import adapters_digest

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = build()
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = step(model, params)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        copy = build(seed=123)  # other init: everything must come from the gathered state
        copy.load_state_dict(full)
        mms.save_adapter(copy, out)
        print(f"sharded loss {loss.item():.8f} digest {adapters_digest({'model': copy})}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
