"""FrontNet cost: counts checked by hand on the Darknet-like model's first layers."""

import torch

from enclaveml.assess.cost import flops, frontnet_cost, param_count, peak_activation_bytes
from enclaveml.models import zoo


def test_cost_of_the_first_conv_by_hand():
    model = zoo.load("darknet", pretrained=False)
    front, _ = model.split(1)
    # conv 3->32, 3x3, no bias + BN(32): 864 + 64 parameters
    assert param_count(front) == 3 * 32 * 9 + 2 * 32
    # 2 FLOPs per multiply-add, 32x32 outputs x 32 channels x 27 inputs
    assert flops(front, (3, 32, 32)) == 2 * 32 * 32 * 32 * 27
    # largest module in+out: BN (or leaky ReLU) on 32x32x32 floats both ways
    assert peak_activation_bytes(front, (3, 32, 32)) == 2 * 32 * 32 * 32 * 4


def test_cost_grows_with_depth_and_budget_is_enforced():
    model = zoo.load("darknet", pretrained=False)
    shallow = frontnet_cost(model.split(1)[0], (3, 32, 32), 93 * 2**20, repeats=2)
    deep = frontnet_cost(model.split(11)[0], (3, 32, 32), 93 * 2**20, repeats=2)
    assert deep["params"] > shallow["params"] and deep["flops"] > shallow["flops"]
    assert shallow["fits"] and shallow["latency_ms"] > 0
    tight = frontnet_cost(model.split(11)[0], (3, 32, 32), 2**20, repeats=1)
    assert not tight["fits"] and tight["enclave_bytes"] > 2**20
    assert deep["params"] == sum(p.numel() for p in model.layers[:11].parameters())
    assert isinstance(torch.get_num_threads(), int)
