"""Compile every Triton kernel of rlhf_fast for an H100 (sm_90) without a GPU: the real
Triton front end, TTIR/TTGIR/LLVM passes and ptxas — what the interpreter never runs.

Run in a process *without* TRITON_INTERPRET (the interpreter replaces @triton.jit);
tests/triton/test_compile.py does that in a subprocess. Prints one line per kernel
variant and exits non-zero on the first failure.
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rlhf_fast.kernels import advantages, fused_linear, kl, ppo_loss, sampling, token_logprobs  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict, consts: dict, num_warps=4, num_stages=3):
    """types: arg name -> Triton type string; consts: arg name -> constexpr value."""
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in consts else types[name]
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(consts))
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def variants(dtypes=("fp32", "bf16")):
    for dt in dtypes:
        # token_logprobs
        for ent in (False, True):
            yield "tl_fwd", token_logprobs._token_logprobs_fwd_kernel, dict(
                logits_ptr=f"*{dt}", labels_ptr="*i64", logp_ptr="*fp32", ent_ptr="*fp32", lse_ptr="*fp32",
                N="i32", V="i32", T_inner="i32", stride_b="i64", stride_t="i64", temperature="fp32",
                ignore_index="i32"), dict(
                ENTROPY=ent, ROWS=1, BLOCK_V=4096), 8
            yield "tl_bwd", token_logprobs._token_logprobs_bwd_kernel, dict(
                logits_ptr=f"*{dt}", labels_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", glogp_ptr="*fp32",
                gent_ptr="*fp32", dlogits_ptr=f"*{dt}", N="i32", V="i32", T_inner="i32", stride_b="i64", stride_t="i64",
                dstride_b="i64", dstride_t="i64", temperature="fp32", ignore_index="i32"), dict(HAS_GLOGP=True, HAS_GENT=ent, ROWS=1, BLOCK_V=4096), 8
        # fused linear forward
        for bias, ent, amax in ((False, True, False), (True, False, False), (False, True, True)):
            yield "fl_fwd", fused_linear._fused_linear_fwd_kernel, dict(
                h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", labels_ptr="*i64", part_ptr="*fp32",
                idx_ptr="*i64" if amax else "*fp32", N="i32", V="i32", H="i32", stride_h="i64", stride_w="i64", temperature="fp32", ignore_index="i32",
                n_row_tiles="i32", split="i32", tiles_per_split="i32"), dict(
                HAS_BIAS=bias, ENTROPY=ent, ARGMAX=amax, PREC="tf32", UPCAST=False, BLOCK_N=64, BLOCK_V=128,
                BLOCK_K=64), 4
        for bias, ent in ((False, True), (True, False)):
            yield "fl_bwd", fused_linear._fused_linear_bwd_kernel, dict(
                h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}", labels_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32",
                glogp_ptr="*fp32", gent_ptr="*fp32", dh_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", N="i32",
                V="i32", H="i32", stride_h="i64", stride_w="i64", temperature="fp32", ignore_index="i32",
                n_row_tiles="i32"), dict(
                HAS_BIAS=bias, HAS_GLOGP=True, HAS_GENT=ent, PREC="tf32", UPCAST=False, BLOCK_N=64, BLOCK_V=64,
                BLOCK_K=64, NEED_H=True, NEED_W=ent, NEED_B=bias), 4
        # kl
        for kind in (0, 1, 2, 3):
            yield "kl_fwd", kl._kl_fwd_kernel, dict(logp_ptr=f"*{dt}", ref_ptr=f"*{dt}", out_ptr="*fp32", n="i64"), dict(
                KIND=kind, CLAMP=20.0, BLOCK=1024), 4
            yield "kl_bwd", kl._kl_bwd_kernel, dict(grad_ptr="*fp32", logp_ptr=f"*{dt}", ref_ptr=f"*{dt}",
                                                    dlogp_ptr=f"*{dt}", n="i64"), dict(KIND=kind, CLAMP=20.0, BLOCK=1024), 4
        # ppo policy / value
        common = dict(logp_ptr=f"*{dt}", old_ptr="*fp32", adv_ptr="*fp32", mask_ptr="*fp32", ref_ptr="*fp32",
                      T="i32", n_tiles="i32", clip_low="fp32", clip_high="fp32", dual_clip="fp32", kl_coef="fp32",
                      ent_coef="fp32")
        for dual, ref, ent in ((False, False, False), (True, True, True)):
            c = dict(HAS_DUAL=dual, HAS_REF=ref, HAS_ENT=ent, KL_KIND=2, CLAMP=20.0, BLOCK_T=1024)
            yield "ppo_fwd", ppo_loss._policy_fwd_kernel, dict(common, ent_ptr="*fp32", part_ptr="*fp32"), dict(c, NP=10), 4
            yield "ppo_bwd", ppo_loss._policy_bwd_kernel, dict(common, grow_ptr="*fp32", dlogp_ptr=f"*{dt}",
                                                               dent_ptr="*fp32"), c, 4
        vcommon = dict(v_ptr=f"*{dt}", old_ptr="*fp32", ret_ptr="*fp32", mask_ptr="*fp32", T="i32", n_tiles="i32",
                       clip="fp32")
        for clip in (False, True):
            yield "value_fwd", ppo_loss._value_fwd_kernel, dict(vcommon, part_ptr="*fp32"), dict(
                HAS_CLIP=clip, NV=5, BLOCK_T=1024), 4
            yield "value_bwd", ppo_loss._value_bwd_kernel, dict(vcommon, grow_ptr="*fp32", dv_ptr=f"*{dt}"), dict(
                HAS_CLIP=clip, BLOCK_T=1024), 4
        # gae / discounted returns (HAS_VALUES off), one program per row and split rows, always
        # with the 16-bit input (the --bf16 run), and fp64 input (fp64 state) with the fp32 one
        for rdt in (dt, "fp64") if dt == "fp32" else (dt,):
            acc = "fp64" if rdt == "fp64" else "fp32"
            scal = dict(gamma_hi="fp32", gamma_lo="fp32", c_hi="fp32", c_lo="fp32")
            ins = dict(r_ptr=f"*{rdt}", v_ptr=f"*{rdt}", m_ptr="*u8")
            for hv in (True, False):
                yield "gae_rows", advantages._rows_kernel, dict(
                    ins, adv_ptr=f"*{acc}", ret_ptr=f"*{acc}", T="i32", **scal), dict(HAS_VALUES=hv, BLOCK=1024), 4
                yield "gae_maps", advantages._tile_maps_kernel, dict(
                    ins, maps_ptr=f"*{acc}", T="i32", n_tiles="i32", **scal), dict(HAS_VALUES=hv, BLOCK=1024), 4
                yield "gae_apply", advantages._apply_kernel, dict(
                    ins, adv_ptr=f"*{acc}", ret_ptr=f"*{acc}", carry_ptr=f"*{acc}", T="i32", n_tiles="i32", **scal), dict(
                    HAS_VALUES=hv, BLOCK=1024), 4
            yield "gae_carry", advantages._carry_kernel, dict(maps_ptr=f"*{acc}", carry_ptr=f"*{acc}", n_tiles="i32"), dict(
                CHUNK=1024), 4
        # sampler: greedy, Gumbel-max, top-k / top-p / min-p (seed and counter words typed as
        # int32 and as int64: Triton types a Python int by its value)
        for greedy, topk, topp, minp in ((True, False, False, False), (False, False, False, False),
                                         (False, True, True, True), (False, False, True, False)):
            for ctr in ("i32", "i64"):
                yield "sample", sampling._sample_kernel, dict(
                    z_ptr=f"*{dt}", tok_ptr="*i64", logp_ptr="*fp32", V="i32", stride="i64", temperature="fp32",
                    top_k="i32", top_p="fp32", min_p="fp32", scale="fp32", seed=ctr, ctr_lo=ctr, ctr_hi=ctr), dict(
                    GREEDY=greedy, TOPK=topk, TOPP=topp, MIN_P=minp, BLOCK_V=2048, RADIX_BLOCK=512), 4
        for greedy in (True, False):  # few long rows: partial statistics per chunk, then a merge
            yield "sample_partial", sampling._partial_kernel, dict(
                z_ptr=f"*{dt}", part_f_ptr="*fp32", part_i_ptr="*i64", V="i32", stride="i64", chunk="i32",
                n_chunks="i32", temperature="fp32", seed="i64", ctr_lo="i64", ctr_hi="i64"), dict(
                GREEDY=greedy, BLOCK_V=2048), 4
            yield "sample_merge", sampling._merge_kernel, dict(
                z_ptr=f"*{dt}", part_f_ptr="*fp32", part_i_ptr="*i64", tok_ptr="*i64", logp_ptr="*fp32", V="i32",
                stride="i64", n_chunks="i32", temperature="fp32"), dict(GREEDY=greedy, CHUNKS=256), 4


def main() -> int:
    # --bf16: the 16-bit variants only (the ones training uses), about half the time
    dtypes = ("bf16",) if "--bf16" in sys.argv else ("fp32", "bf16")
    for name, fn, types, consts, nw in variants(dtypes):
        k = compile_kernel(fn, types, consts, num_warps=nw)
        first = next(v for v in types.values() if v.startswith("*"))
        print(f"ok {name} {first}"
              f" {consts} cubin={len(k.asm['cubin'])}B shared={k.metadata.shared}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
