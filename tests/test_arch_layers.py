import pytest
import torch
from torch import nn

from dpnle.arch import UnsupportedModelError, architecture, parse_layers


@pytest.mark.parametrize(
    "spec,expected",
    [(None, list(range(8))), ("all", list(range(8))), ("2-4", [2, 3, 4]), ("0,7,3", [0, 3, 7]),
     ("-2--1", [6, 7]), ("5--1", [5, 6, 7]), ("1-2,2-3", [1, 2, 3])],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 8) == expected


@pytest.mark.parametrize("spec,message", [("4-2", "Empty layer range"), ("9", "out of range"), ("x", "not a layer"),
                                          (",", "selects no layer")])
def test_parse_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(spec, 8)


class _NoMlpLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.ffn = nn.Linear(4, 4)


class _Model(nn.Module):
    def __init__(self, layer_cls):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer_cls() for _ in range(2)])


def test_unsupported_model_names_class_and_modules():
    with pytest.raises(UnsupportedModelError, match=r"_Model.*no 'mlp' module.*attn, ffn"):
        architecture(_Model(_NoMlpLayer))
    with pytest.raises(UnsupportedModelError, match=r"Cannot find the decoder layers of Linear.*Modules found"):
        architecture(nn.Linear(2, 2))


def test_ungated_model_has_no_gate_site():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    arch = architecture(model)
    assert arch.num_layers == 2 and arch.intermediate_size == 64 and arch.hidden_size == 16
    assert arch.layers[0].output_projection_name == "c_proj"
    assert arch.output_weight(0).shape == (16, 64)
    with pytest.raises(UnsupportedModelError, match="no gated MLP"):
        arch.module_for("gate", 0)
