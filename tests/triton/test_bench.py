"""benchmarks/bench_triton.py imports without a GPU and its CPU (interpreter) correctness
run agrees with the reference; kernel-only keywords are validated."""

import pytest
import torch


def test_bench_quick_cpu_correctness():
    from rlhf_fast.benchmarks import bench_triton

    if torch.cuda.is_available():
        pytest.skip("the CPU correctness run is for machines without a GPU")
    (table,) = bench_triton.run_suite(device="cpu", quick=True)
    assert [r["op"] for r in table.rows] == list(bench_triton.OPS)
    for r in table.rows:
        assert not r.get("error"), r
        assert r["fwd_err"] < 1e-3 and r["grad_err"] < 1e-3, r


def test_fused_linear_backward_choice_is_validated():
    from rlhf_fast.kernels.fused_linear import fused_linear_logprobs, fused_linear_policy_loss

    h, w, lab = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="backward"):
        fused_linear_logprobs(h, w, lab, backward="cuBLAS")
    with pytest.raises(ValueError, match="backward"):
        fused_linear_policy_loss(h[None], w, lab[None], torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                                 backward="x")


def test_gpu_table_can_leave_out_the_torch_compile_peer():
    from rlhf_fast.benchmarks import bench_triton

    for op in bench_triton.OPS:
        with_compile = bench_triton._providers(op)
        without = bench_triton._providers(op, compile_peer=False)
        assert "torch.compile(reference)" in with_compile and "torch.compile(reference)" not in without
        assert set(with_compile) - set(without) == {"torch.compile(reference)"}
