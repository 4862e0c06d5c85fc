"""fairseq2's transformer with plain projections: same function, same parameters, every projection convertible."""

import copy

import pytest
import torch
from conftest import require_translation_extra
from torch import nn

require_translation_extra()

from fairseq2.models.nllb import NllbConfig, create_nllb_model  # noqa: E402
from fairseq2.nn import BatchLayout, TiedProjection  # noqa: E402

from lr_lightning.models.seq2seq import build_transformer, plain_projections_  # noqa: E402

CONFIG = dict(model_dim=32, max_seq_len=32, vocab_size=50, pad_idx=0, num_encoder_layers=2, num_decoder_layers=2,
              num_encoder_attn_heads=4, num_decoder_attn_heads=4, ffn_inner_dim=64, dropout_p=0.0)
# per encoder layer: q, k, v, output + FFN inner, output; per decoder layer also the cross-attention's four
PROJECTIONS = 2 * 6 + 2 * 10


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(4, 50, (3, 7), generator=g), torch.randint(4, 50, (3, 5), generator=g)
    src_layout, tgt_layout = BatchLayout(src.shape, [7, 5, 3]), BatchLayout(tgt.shape, [5, 4, 2])
    return model.eval()(src, src_layout, tgt, tgt_layout)


def test_plain_projections_keep_the_function_and_share_the_parameters():
    torch.manual_seed(0)
    original = create_nllb_model(NllbConfig(**CONFIG))
    model = copy.deepcopy(original)
    before = {n: p for n, p in model.named_parameters()}
    assert plain_projections_(model) == PROJECTIONS
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert len(linears) == PROJECTIONS
    assert {n: p for n, p in model.named_parameters()} == before  # same Parameter objects, same names
    assert isinstance(model.final_proj, TiedProjection)
    assert torch.equal(logits(model), logits(original))


def test_a_sharded_projection_is_refused():
    model = create_nllb_model(NllbConfig(**CONFIG))
    model.encoder.layers[0].self_attn.q_proj.sharded = True
    with pytest.raises(ValueError, match="ColumnShardedLinear is sharded"):
        plain_projections_(model)


def test_build_transformer_ties_the_output_projection_to_the_shared_embedding():
    model = build_transformer(vocab_size=50, model_dim=32, num_layers=1, num_heads=4, ffn_dim=64)
    assert model.final_proj.weight is model.encoder_frontend.embed.weight
    assert model.decoder_frontend is model.encoder_frontend
    assert sum(type(m) is nn.Linear for m in model.modules()) == 6 + 10
