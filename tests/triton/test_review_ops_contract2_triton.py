"""Second review of the public op contract on the Triton kernels (under TRITON_INTERPRET=1 on
the CPU, or on a GPU): they must agree with reference.py, the specification, on awkward inputs.
Each test pins one defect the earlier reviews missed."""

import pytest
import torch

from rlhf_fast import ops

from .conftest import device


def _nan_at_an_unmasked_token(where: int):
    """[2, 5] inputs (logp / values, old_logp / old_values, advantages / returns), all tokens
    counted; row 0's third token NaN in input ``where`` (a diverged policy's logp, a value head's
    output that overflowed)."""
    x = [torch.zeros(2, 5), torch.zeros(2, 5), -torch.ones(2, 5)]  # A < 0: the dual clip's branch
    x[where][0, 2] = float("nan")
    return [t.to(device()) for t in x]


@pytest.mark.parametrize("where", [0, 1])
@pytest.mark.parametrize("op,dual_clip", [("ppo_policy_loss", None), ("ppo_policy_loss", 3.0),
                                          ("ppo_value_loss", None)])
def test_nan_at_an_unmasked_token_gives_a_nan_loss(op, dual_clip, where):
    """The reference and the C++ kernel give NaN for a NaN at a token that counts; the Triton
    kernels clamped the NaN log-ratio with tl.maximum / tl.minimum, which return the non-NaN
    operand: the token became a ratio of e^-20 with no gradient, and the policy loss came out
    finite (-0.9 with A = 1 and logp NaN), as did the value loss (0.522): a diverged step that
    nothing notices."""
    a, b, c = _nan_at_an_unmasked_token(where)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device())
    with ops.use_backend("triton"):
        if op == "ppo_policy_loss":
            loss, _ = ops.ppo_policy_loss(a, b, c, mask, dual_clip=dual_clip)
        else:
            loss, _ = ops.ppo_value_loss(a, b, c, mask)
    with ops.use_backend("torch"):
        expected = (ops.ppo_policy_loss(a, b, c, mask, dual_clip=dual_clip) if op == "ppo_policy_loss"
                    else ops.ppo_value_loss(a, b, c, mask))[0]
    assert expected.isnan()  # the specification's answer
    assert loss.isnan(), loss
