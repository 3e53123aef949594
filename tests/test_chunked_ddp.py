"""The chunked answer log-probs under DistributedDataParallel: the decoder runs inside the wrapped model's call, so
DDP averages the gradients of both processes. (Calling the decoder directly would leave each process with its own
gradients, and the ranks would drift apart.)"""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18, 19], [20, 21, 22, 23, 24, 25, 26]]
PROMPT_LENS = [3, 2, 2, 4]


def lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def shard_grads(model, rows: slice) -> dict[str, torch.Tensor]:
    """Gradients of the summed answer log-probs of ROWS[rows], through the chunked path (the caller sets
    heads.CHUNK_ELEMENTS = 1: one token per chunk)."""
    from align.modeling import heads

    ids, mask = heads.pad_batch(ROWS[rows], pad_id=0)
    labels = heads.answer_labels(ids, mask, PROMPT_LENS[rows])
    model.zero_grad()
    heads.labelled_logps(model, ids, mask, labels)[0].sum().backward()
    return {n: p.grad.clone() for n, p in heads.unwrap(model).named_parameters() if p.grad is not None}


def worker(rank: int, model_dir: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from align.modeling import heads

        heads.CHUNK_ELEMENTS = 1  # this process only
        calls = []
        real = heads.chunked_token_logps
        heads.chunked_token_logps = lambda *a: calls.append(1) or real(*a)
        model = torch.nn.parallel.DistributedDataParallel(lora_model(model_dir))
        grads = shard_grads(model, slice(2 * rank, 2 * rank + 2))
        grads["chunked_calls"] = torch.tensor(len(calls))
        save_file(grads, os.path.join(out_dir, f"grads_{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def test_chunked_logps_synchronise_gradients_under_ddp(tmp_path, tiny_model_dir, monkeypatch):
    import torch.multiprocessing as mp

    from align.modeling import heads

    monkeypatch.setattr(heads, "CHUNK_ELEMENTS", 1)
    mp.spawn(worker, args=(str(tiny_model_dir), str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"grads_{r}.safetensors")) for r in (0, 1)]
    assert [int(g.pop("chunked_calls")) for g in ranks] == [1, 1]  # the chunked path ran, under DDP
    model = lora_model(tiny_model_dir)
    local = [shard_grads(model, slice(0, 2)), shard_grads(model, slice(2, 4))]
    assert ranks[0].keys() == local[0].keys() and len(local[0]) > 0
    for name, g0 in local[0].items():
        mean = (g0 + local[1][name]) / 2
        for r in (0, 1):
            # within float rounding of the tensor's scale: the processes run their matmuls on one thread, this
            # one on several, so sums are taken in other orders (~1e-5 of the scale); unsynchronised ranks are ~1 off
            assert (ranks[r][name] - mean).abs().max() <= 1e-4 * mean.abs().max(), (r, name)
    # the shards' own gradients differ from their mean: without synchronisation the test fails
    assert any(not torch.allclose(local[0][n], local[1][n], atol=1e-3) for n in local[0])
