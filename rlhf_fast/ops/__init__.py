"""The public op API of rlhf_fast: the contract other trainers import.

Every op dispatches per call to a Triton / CUDA C++ kernel for CUDA tensors, the C++
CPU kernel for CPU tensors, or the pure-PyTorch reference (``rlhf_fast.ops.reference``).
``use_backend("torch")`` or ``RLHF_FAST_BACKEND`` forces a backend.
"""

from . import _dispatch, reference
from ._dispatch import BACKENDS, use_backend
from .advantages import discounted_returns, gae, group_advantages, masked_mean, masked_whiten
from .fused_divergence import fused_linear_divergence
from .fused_linear import fused_linear_logprobs, fused_linear_policy_loss
from .kl import kl_penalty
from .logprobs import token_logprobs
from .ppo_loss import ppo_policy_loss, ppo_value_loss
from .sampling import sample
from . import _cuda, _triton  # noqa: E402,F401  (register GPU backends after the front ends)

_dispatch.probe_all()

__all__ = [
    "token_logprobs",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "fused_linear_divergence",
    "kl_penalty",
    "gae",
    "discounted_returns",
    "group_advantages",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sample",
    "use_backend",
    "BACKENDS",
    "reference",
]
