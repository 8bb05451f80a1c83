"""GAE test inputs and an oracle shared by the CUDA and Triton kernel tests."""

import torch


def gae_mask(B, T, g, kind):
    """A [B, T] bool mask: full, random, left padding, every other row empty, or holes."""
    if kind == "random":
        return torch.rand(B, T, generator=g) > 0.3
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "left_pad":
        for b in range(B):
            m[b, : (b * 7) % max(T, 1)] = False
    if kind == "empty_rows":
        m[::2] = False
    if kind == "holes":  # multi-turn: masked runs in the middle and a masked right end
        m[:, 1::3] = False
        m[:, T - T // 4:] = False
    return m


def gae_loop(r, v, m, gamma, lam):
    """Advantages of one row by a plain float64 loop over its unmasked tokens (independent of
    reference.py): r, v, m 1-D tensors → a float64 tensor."""
    rr, vv, mm = r.tolist(), v.tolist(), m.tolist()
    exp = [0.0] * len(rr)
    a = nv = 0.0
    for t in range(len(rr) - 1, -1, -1):
        if mm[t]:
            a = rr[t] + gamma * nv - vv[t] + gamma * lam * a
            nv = vv[t]
            exp[t] = a
    return torch.tensor(exp, dtype=torch.float64)
