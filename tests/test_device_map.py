# device_map.py: layers spread over placements. On CPU the plumbing runs with two names of the CPU ("cpu" and
# "cpu:0" are two placements to the map: every boundary hook moves the activations and positions), and must give
# one device's logits and greedy tokens, with each placement holding its share of the bytes.
import pytest
import torch

import device_map as dm
import generate as gen


def test_the_plan_follows_the_proportions():
    assert dm.plan("cuda:0=20,cpu=12", 32) == ["cuda:0"] * 20 + ["cpu"] * 12
    assert dm.plan("cuda:0=3,cuda:1=1", 30) == ["cuda:0"] * 22 + ["cuda:1"] * 8
    assert dm.plan("cuda:0=1000,cpu=1", 30) == ["cuda:0"] * 29 + ["cpu"]   # every placement at least one layer
    for bad in ("cuda:0", "cuda:0=x", "cuda:0=-1,cpu=1", "tpu=1", "cpu=nan"):
        with pytest.raises(ValueError, match="--device_map"):
            dm.plan(bad, 30)


@torch.no_grad()
def test_two_placements_give_one_devices_logits(default_checkpoint):
    one = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32)
    two = gen.load_model(default_checkpoint / "model.pth", "cpu", torch.float32, device_map="cpu=2,cpu:0=1")
    assert two.device_map == ["cpu"] * 20 + ["cpu:0"] * 10 and two.head_apart
    ids = torch.randint(0, 1000, (2, 12))
    torch.testing.assert_close(two(ids), one(ids), atol=0, rtol=0)
    prompts = [ids[0].tolist(), ids[1, :7].tolist()]
    assert gen.generate(two, prompts, 16, temperature=0) == gen.generate(one, prompts, 16, temperature=0)
    held = dm.placement_bytes(two)   # weights and KV cache: 20 layers + the embedding, 10 layers + a head copy
    layer = sum(t.numel() * t.element_size() for t in list(two.layers[0].parameters()) + list(two.layers[0].buffers()))
    embedding = two.tok_embeddings.weight.numel() * two.tok_embeddings.weight.element_size()
    assert held["cpu"] == 20 * layer + embedding
    assert held["cpu:0"] == 10 * layer + embedding + two.norm.weight.numel() * 4
