"""Registration of the Triton implementations (rlhf_fast/kernels/*.py)
with the dispatch. Lazy "module:attr" paths, so `import rlhf_fast` never imports Triton."""

from . import _dispatch

_IMPLS = {
    "token_logprobs": "rlhf_fast.kernels.token_logprobs:token_logprobs",
    "fused_linear_logprobs": "rlhf_fast.kernels.fused_linear:fused_linear_logprobs",
    "fused_linear_policy_loss": "rlhf_fast.kernels.fused_linear:fused_linear_policy_loss",
    "kl_penalty": "rlhf_fast.kernels.kl:kl_penalty",
    "ppo_policy_loss": "rlhf_fast.kernels.ppo_loss:ppo_policy_loss",
    "ppo_value_loss": "rlhf_fast.kernels.ppo_loss:ppo_value_loss",
    "gae": "rlhf_fast.kernels.advantages:gae",
    "discounted_returns": "rlhf_fast.kernels.advantages:discounted_returns",
    "sample": "rlhf_fast.kernels.sampling:sample",
    "fused_linear_divergence": "rlhf_fast.kernels.fused_divergence:fused_linear_divergence",
}

for _op, _path in _IMPLS.items():
    _dispatch.register(_op, "triton", _path)
