"""A lone request's shortcuts in the enclave compute the same bits as the general code: flat
execution plans (`serve/flat.py`) against the modules (and they decline anything they do not
know), the class mapping on Python lists against the tensor gather, cached normalisation."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from enclaveml.models import zoo
from enclaveml.models.classmap import ClassMapping
from enclaveml.serve.flat import flatten, runner


@pytest.mark.parametrize("name,k", [("darknet", 10), ("darknet", 3), ("extraction", 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flat_plan_equals_the_modules_bit_for_bit(name, k, channels_last, one_thread):
    torch.manual_seed(0)
    model = zoo.load(name, pretrained=False).eval()
    for m in model.modules():  # non-trivial batch-norm statistics, so that they matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    layers = list(model.layers.named_children())
    front = nn.Sequential(OrderedDict(layers[:k])).eval()
    back = nn.Sequential(OrderedDict(layers[k:])).eval()
    if channels_last:
        front, back = front.to(memory_format=torch.channels_last), back.to(memory_format=torch.channels_last)
    run_front, run_back = runner(front), runner(back)
    assert run_front is not front and run_back is not back  # both have a plan
    for rows in (1, 3):
        x = torch.randn(rows, 3, 32, 32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ir, ir_flat = front(x.clone()), run_front(x.clone())
            assert torch.equal(ir, ir_flat) and ir.stride() == ir_flat.stride()
            assert torch.equal(back(ir), run_back(ir_flat))
        with torch.inference_mode():
            assert torch.equal(back(front(x.clone())), run_back(run_front(x.clone())))


class _Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_flatten_declines_what_it_does_not_know():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert flatten(nn.Sequential(conv, nn.ReLU()).eval()) is not None
    assert flatten(nn.Sequential(conv, _Custom()).eval()) is None  # an unknown layer type
    assert flatten(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")).eval()) is None
    assert flatten(nn.Sequential(conv, nn.BatchNorm2d(4))) is None  # batch norm in training mode
    assert flatten(nn.Sequential(conv, nn.Dropout())) is None  # dropout in training mode
    hooked = copy.deepcopy(conv)
    hooked.register_forward_hook(lambda m, i, o: o + 1)
    net = nn.Sequential(hooked).eval()
    assert flatten(net) is None and runner(net) is net  # a hook: the module runs itself

    class Sub(nn.Sequential):  # a Sequential with its own forward
        def forward(self, x):
            return super().forward(x) + 1

    assert flatten(Sub(conv).eval()) is None
    assert flatten(nn.Sequential().eval()) is None


def test_class_mapping_on_lists_equals_the_tensor_gather_and_softmax():
    g = torch.Generator().manual_seed(1)
    m = ClassMapping.random(10, generator=g)
    for scale in (1e-3, 1.0, 30.0, 1e4):
        scores = (torch.randn(7, 10, generator=g) * scale).float()
        ref = m.to_original(scores)
        rows = m.rows_to_original(scores.tolist())
        assert rows == ref.tolist()
        ref_p = torch.softmax(ref.double(), dim=1).tolist()
        assert torch.softmax(torch.tensor(rows, dtype=torch.float64).reshape(7, 10), dim=1).tolist() == ref_p
    with pytest.raises(ValueError):
        m.rows_to_original([[0.0] * 9])


def test_a_head_working_in_place_takes_the_outputs_of_a_whole_pass(tmp_path):
    """A pass answered whole in the enclave runs in inference mode, so its outputs are inference
    tensors; a classifier head whose first layer works in place must still take them."""
    from enclaveml.crypto import SigningKey
    from enclaveml.data.preprocess import Preprocessing
    from enclaveml.protocol import ModelRef
    from enclaveml.protocol import infer as protocol
    from enclaveml.serve.enclave import Deployment, EnclaveService, _Pending
    from enclaveml.tee import get_backend

    class Plain:  # seals nothing: the test reads the answer's plaintext
        def seal_response(self, pt, aad):
            return pt

    svc = EnclaveService(get_backend("sim", platform_dir=tmp_path / "p", lock_memory=False))
    owner = SigningKey.generate().public_key()
    torch.manual_seed(0)
    head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3)).eval()
    mapping = ClassMapping.random(3, ["a", "b", "c"])
    dep = Deployment(ModelRef(owner.to_bytes().hex(), "m"), owner, nn.Sequential(nn.Identity()).eval(), mapping,
                     Preprocessing(), "ab" * 32, 1, head, 1, (4,))
    with torch.inference_mode():
        out = torch.randn(1, 4)
    expected = mapping.to_original(head(out.clone()))[0].tolist()
    sealed = svc._answer(_Pending(Plain(), dep, 3, True, b"", 0.0, (0,)), out)
    (res,) = protocol.decode_results(sealed, 1)
    assert res["logits"] == expected
