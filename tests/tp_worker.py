# What tests/test_tp.py compares between tensor-parallel ranks and one process. Under torchrun:
#   torchrun --standalone --nproc_per_node=N tests/tp_worker.py OUT.pt model.pth [model.pth ...]
# rank 0 writes {checkpoint: measure(...)} to OUT.pt; imported, measure() gives the one-process numbers.
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate as gen  # noqa: E402
from eval import make_lm  # noqa: E402

PROMPTS = [[1, 5, 9, 2, 7, 3], [4, 4, 8, 1]]


@torch.no_grad()
def measure(checkpoint, use_tp: bool = False) -> dict:
    """Full-forward logits, greedy continuations (batched, through the KV cache) and eval.py's log-likelihoods,
    all in fp32, plus how many bytes of layer weights this process holds."""
    torch.manual_seed(0)
    model = gen.load_model(checkpoint, "cpu", torch.float32, use_tp=use_tp)
    vocab = model.config.vocab_size
    ids = torch.tensor([[t % vocab for t in range(3, 40, 3)]])
    logits = model(ids)
    greedy = gen.generate(model, PROMPTS, 12, temperature=0)
    lm = make_lm(model, tokenizer=None, batch_size=2, max_length=32)
    requests = [(None, [1, 2, 3, 4], [5, 6]), (None, [7, 8], [9, 10, 11]), (None, [12], [13])]
    loglik = lm._loglikelihood_tokens(requests)
    layer_bytes = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                      if name.startswith("layers.") and "cache" not in name)
    return dict(logits=logits, greedy=greedy, loglik=loglik, layer_bytes=layer_bytes)


def main():
    import torch.distributed as dist

    from tp import maybe_init_dist
    out, checkpoints = Path(sys.argv[1]), sys.argv[2:]
    rank = maybe_init_dist("cpu")
    results = {}
    for path in checkpoints:
        r = measure(path, use_tp=True)
        held = [None] * dist.get_world_size()
        dist.all_gather_object(held, r["layer_bytes"])
        results[path] = dict(r, layer_bytes=held)
    if rank == 0:
        tmp = out.with_suffix(".tmp")
        torch.save(results, tmp)
        os.replace(tmp, out)
    dist.barrier()   # every rank is done before any tears gloo down (a rank once aborted in teardown: exit -6)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
