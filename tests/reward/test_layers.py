"""rlsim.reward.layers: torch's maths with a faster dropout, the same parameters and checkpoints."""

import torch
from torch import nn

from rlsim.reward.layers import Dropout, EncoderLayer, drop_threshold, dropout


def _pair(p: float):
    torch.manual_seed(0)
    ours = EncoderLayer(16, 4, 32, p, batch_first=True, activation="gelu", norm_first=True)
    theirs = nn.TransformerEncoderLayer(16, 4, 32, p, batch_first=True, activation="gelu", norm_first=True)
    theirs.load_state_dict(ours.state_dict())  # same names: a checkpoint of either loads into the other
    return ours, theirs


def test_training_forward_and_gradients_match_torch_without_dropout():
    ours, theirs = _pair(0.0)
    x = torch.randn(5, 6, 16)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 3:] = True  # the first token may not see the last three
    for m in (None, mask):
        a, b = ours.train()(x, src_mask=m), theirs.train()(x, src_mask=m)
        torch.testing.assert_close(a, b)
        a.square().sum().backward()
        b.square().sum().backward()
        for (name, pa), pb in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, msg=name)
            pa.grad = pb.grad = None


def test_an_additive_mask_is_read_like_a_bool_one():
    ours, _ = _pair(0.0)
    x = torch.randn(3, 6, 16)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:, 0] = True
    additive = torch.zeros(6, 6).masked_fill(mask, float("-inf"))
    torch.testing.assert_close(ours.train()(x, src_mask=mask), ours.train()(x, src_mask=additive))


def test_inference_is_torchs_own_forward():
    ours, theirs = _pair(0.3)
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_dropout_zeroes_a_share_p_and_keeps_the_mean():
    torch.manual_seed(1)
    x = torch.ones(200_000)
    y = dropout(x, 0.3, True)
    assert drop_threshold(0.3) == 77  # p in 256ths: 0.3008
    assert abs(float((y == 0).float().mean()) - 77 / 256) < 0.005  # ~7 standard errors
    assert abs(float(y.mean()) - 1.0) < 0.01
    torch.testing.assert_close(torch.unique(y), torch.tensor([0.0, 256 / 179]))
    # Every byte of each 64-bit draw is used: a shape that is no multiple of 8, and a 2-D one.
    z = dropout(torch.ones(3, 333), 0.5, True)
    assert z.shape == (3, 333) and set(torch.unique(z).tolist()) == {0.0, 2.0}
    assert 0.4 < float((z == 0).float().mean()) < 0.6
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x)) and dropout(x, 0.001, True) is x
    assert dropout(x, 0.3, False) is x
    d = Dropout(0.5).eval()
    assert torch.equal(d(x), x)
