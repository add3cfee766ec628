"""moe_ffn kernels (decode, grouped and dense paths) against the float32 PyTorch reference.

CPU cases run under TRITON_INTERPRET=1 with tiny shapes; the same table runs on CUDA with -m gpu,
plus 7B-shaped cases. Letters: T tokens, H hidden, I expert intermediate, E routed experts,
K active per token, SI shared intermediate (0: no shared expert).
"""

from dataclasses import dataclass

import pytest
import torch

from moecarve.kernels import moe_ffn, moe_ffn_reference


@dataclass(frozen=True)
class Case:
    T: int
    H: int
    I: int  # noqa: E741
    E: int
    K: int
    SI: int
    route: str = "random"  # random | one_expert | skip_last | sentinel | duplicate | int32


CASES = {
    "T1": Case(1, 64, 32, 4, 2, 32),  # batch-1 decode, most experts skipped
    "T_odd": Case(19, 64, 32, 4, 2, 32),  # T not a multiple of the 16-row block: masked rows
    "A1": Case(5, 64, 32, 5, 1, 32),  # one routed expert per token
    "A_all": Case(6, 64, 32, 4, 4, 32),  # A = E - S: every routed expert active for every token
    "E_prime": Case(9, 64, 32, 7, 2, 32),  # prime expert count
    "H_odd": Case(3, 48, 24, 5, 2, 40),  # hidden not a power of two; I and SI not multiples of 16
    "I_odd": Case(5, 48, 21, 5, 2, 21),  # odd I: rows at any element (kernels told 1-element alignment)
    "I_2mod4": Case(6, 48, 10, 4, 2, 30),  # I and SI multiples of 2 only (told 2-element alignment)
    "one_expert": Case(21, 64, 32, 5, 1, 0, "one_expert"),  # all tokens to expert 0, no shared
    "empty_expert": Case(7, 64, 32, 6, 2, 32, "skip_last"),  # the last expert: no token, inf weights
    "duplicate": Case(6, 64, 32, 5, 2, 32, "duplicate"),  # a token picks one expert twice: both count
    "sentinel": Case(4, 64, 32, 5, 2, 32, "sentinel"),  # index E (expert-parallel sentinel) is dropped
    "K3": Case(5, 64, 32, 7, 3, 32),  # K not a power of two: the kernels pad the picks to 4
    "int32_ids": Case(6, 64, 32, 5, 2, 32, "int32"),  # the fused router's int32 indices
}
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}  # relative Frobenius error against float32


def make_inputs(c: Case, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = rnd(c.T, c.H)
    w13 = rnd(c.E, 2 * c.I, c.H, scale=c.H**-0.5)
    w2 = rnd(c.E, c.H, c.I, scale=c.I**-0.5)
    n_pick = c.E - 1 if c.route == "skip_last" else c.E
    idx = torch.rand(c.T, n_pick, generator=g).topk(c.K, dim=-1).indices
    if c.route == "one_expert":
        idx.zero_()
    if c.route == "sentinel":
        idx[0, 0] = c.E
    if c.route == "duplicate":
        idx[:, 1] = idx[:, 0]
    if c.route == "int32":
        idx = idx.to(torch.int32)
    if c.route == "skip_last":  # an expert no token picked must not be computed into the output
        w13[-1] = float("inf")
    wts = torch.rand(c.T, c.K, generator=g) + 0.1
    if not c.SI:
        return x, idx.to(device), wts.to(device), w13, w2, [None, None, None]
    shared = [
        rnd(c.SI, c.H, scale=c.H**-0.5),
        rnd(c.SI, c.H, scale=c.H**-0.5),
        rnd(c.H, c.SI, scale=c.SI**-0.5),
    ]
    return x, idx.to(device), wts.to(device), w13, w2, shared


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(c: Case, dtype, device, path, **cfg):
    inputs = make_inputs(c, dtype, device)
    x, idx, wts, w13, w2, shared = inputs
    ref = moe_ffn_reference(
        x.float(), idx, wts, w13.float(), w2.float(), *[s if s is None else s.float() for s in shared]
    )
    out = moe_ffn(x, idx, wts, w13, w2, *shared, path=path, **cfg)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], (path, rel_err(out, ref))


def small_configs(max_block_t: int = 64, path: str = "auto"):
    """Small tiles of `path` (all three for auto)."""
    from moecarve.kernels.ops.configs import DecodeConfig, DenseConfig, GroupedConfig

    # blocks smaller than H and I so that both the unmasked main loops and the masked tails run
    tiles = {
        "decode_config": DecodeConfig(
            block_i=16, block_h=32, block_n=16, block_k=32, max_block_t=max_block_t
        ),
        "grouped_config": GroupedConfig(block_m=16, block_n=16, block_k=32),
        "dense_config": DenseConfig(block_m=16, block_n=16, block_k=16),
    }
    return tiles if path == "auto" else {f"{path}_config": tiles[f"{path}_config"]}


# decode: one token tile; decode-tiled: 16-token tiles, so T = 19 and 21 take two; grouped: sorted
# pairs; dense: every expert on every token (16-token tiles: T = 19 and 21 take two)
PATHS = {
    "decode": ("decode", 64),
    "decode-tiled": ("decode", 16),
    "grouped": ("grouped", 64),
    "dense": ("dense", 64),
}


# 16-token tiles change nothing for T <= 16: tiled runs only where T spans two tiles
INTERP = [
    pytest.param(c, p, id=f"{cn}-{pn}")
    for cn, c in CASES.items()
    for pn, p in PATHS.items()
    if pn != "decode-tiled" or c.T > 16
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,path", INTERP)
def test_kernels_match_reference_interpreted(interp_device, case, path, dtype):
    check(case, dtype, interp_device, path[0], **small_configs(path[1], path[0]))


def test_vector_align_is_what_every_size_allows():
    """What the kernels are told of I, SI and the row strides (ops.moe_ffn.vector_align): a wrong
    answer would make Triton assume aligned rows that are not (wrong loads on a GPU)."""
    pytest.importorskip("triton")
    from moecarve.kernels.ops.moe_ffn import vector_align

    assert vector_align(344, itemsize=2) == 8  # 11008 / 32: 8 bf16 = one 16-byte vector
    assert vector_align(344, itemsize=4) == 4  # fp32: 4 per vector
    assert vector_align(688, 1376, 11008, itemsize=2) == 8  # a multiple of 16 is capped at one vector
    assert vector_align(344, 688, 4096 * 344, itemsize=2) == 8
    assert vector_align(344, 30, itemsize=2) == 2  # every size must divide: gcd 2
    assert vector_align(21, itemsize=2) == vector_align(344, 21, itemsize=2) == 1
    assert vector_align(24, 0, itemsize=2) == 8  # no shared expert: SI = 0 divides by anything


@pytest.mark.parametrize("path", ["auto", "decode", "grouped", "dense"])
def test_default_tiles_interpreted(interp_device, path):
    check(Case(3, 48, 24, 5, 2, 24), torch.float32, interp_device, path)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["router", "transformers"])
def test_dense_path_launches_three_gemms_and_its_kernel(monkeypatch, index_dtype):
    """Four launches, against the dense FFN's five: the path must not lose to it on small kernels
    (a gate matrix, the shared SiLU*up) before its GEMMs have run."""
    from torch.profiler import ProfilerActivity, profile

    from moecarve.kernels.ops import moe_ffn as ops

    launched = []

    class Launcher:  # the Triton launch, counted instead of run
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append(grid)

    monkeypatch.setattr(ops, "_dense_down_kernel", Launcher())
    x, idx, wts, w13, w2, shared = make_inputs(Case(16, 64, 32, 6, 2, 32), torch.bfloat16, "cpu")
    idx = idx.to(index_dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ops.moe_ffn_dense(x, idx, wts, w13, w2, tuple(shared))
    top_level = [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
    ]
    no_kernel = {
        "aten::view",
        "aten::empty",
        "aten::contiguous",
        "aten::reshape",
        "aten::t",
        "aten::transpose",
    }
    assert sorted(n for n in top_level if n not in no_kernel) == ["aten::linear"] * 3, top_level
    assert len(launched) == 1


def test_auto_takes_decode_while_a_batch_hits_few_experts(interp_device, monkeypatch):
    from moecarve.kernels import functional
    from moecarve.kernels.ops import moe_ffn as ops

    # S2A2E16 (14 routed, top-2): 8 tokens hit 71% of the experts, 16 tokens 92%
    assert functional.auto_path(1, 2, 14) == functional.auto_path(8, 2, 14) == "decode"
    assert functional.auto_path(16, 2, 14) == functional.auto_path(4096, 2, 14) == "dense"
    # S2A4E32 (30 routed, top-4): 5 tokens are expected to hit 15.3 experts, 6 tokens 17.3 (58%); the
    # H100 measured decode at 0.66x the dense FFN at 8 tokens (20.5 hit, 68%)
    assert functional.auto_path(5, 4, 30) == "decode" and functional.auto_path(6, 4, 30) == "dense"
    assert functional.auto_path(8, 4, 30) == functional.auto_path(16, 4, 30) == "dense"
    assert functional.auto_path(1, 8, 8) == "dense"  # K >= E: every expert is hit at once
    assert functional.auto_path(1, 3, 5) == "decode" and functional.auto_path(3, 3, 5) == "dense"
    # many small experts: 16 tokens hit 15.9 of 1000 at top-1, 17 tokens 16.9 (1.7%)
    assert functional.auto_path(16, 1, 1000) == "decode" and functional.auto_path(17, 1, 1000) == "dense"
    taken = []
    for name in ("moe_ffn_decode", "moe_ffn_dense"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    for T in (2, 40):  # E = 4, K = 2: 2 tokens hit 75% of the experts, 40 tokens all of them
        check(Case(T, 48, 24, 4, 2, 24), torch.float32, interp_device, "auto")
    assert taken == ["moe_ffn_decode", "moe_ffn_dense"]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernels_match_reference_cuda(cuda_device, case, path, dtype):
    tol_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    inputs = make_inputs(case, dtype, cuda_device)
    x, idx, wts, w13, w2, shared = inputs
    ref = moe_ffn_reference(
        x.float(), idx, wts, w13.float(), w2.float(), *[s if s is None else s.float() for s in shared]
    )
    for kw in ({}, small_configs(path[1], path[0])):
        out = moe_ffn(x, idx, wts, w13, w2, *shared, path=path[0], **kw)
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[tol_dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 5, 16, 32, 33, 64, 256])
@pytest.mark.parametrize("path", ["auto", "decode", "grouped", "dense", "torch"])
def test_7b_shapes_cuda(cuda_device, T, path):
    """S2A2E16 at hidden 4096 / intermediate 11008: E = 14 routed of I = 688, SI = 1376."""
    check(Case(T, 4096, 688, 14, 2, 1376), torch.bfloat16, cuda_device, path)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64])
@pytest.mark.parametrize("path", ["decode", "grouped", "dense"])
def test_7b_experts_aligned_to_8_rows_only_cuda(cuda_device, T, path):
    """S2A4E32 at intermediate 11008: experts of I = 344 rows, a multiple of 8 but not of 16, which
    the kernels are told (I_ALIGN) so that they load them in 16-byte vectors."""
    check(Case(T, 4096, 344, 30, 4, 688), torch.bfloat16, cuda_device, path)


@pytest.mark.parametrize(
    "T,H,E,K,split",
    [
        (1, 40, 5, 2, None),  # one H block
        (6, 40, 7, 3, None),
        (3, 40, 4, 4, None),  # K = E
        (1, 600, 14, 2, None),  # 3 H blocks of 256 (the last partial), one program each
        (5, 600, 14, 2, 2),  # 2 programs per token: 512 + 88 columns
        (2, 600, 33, 3, 4),  # E above a power of two: 10 blocks of 64, 3 per program
        (4, 600, 14, 2, 1),  # one program per token (large-batch schedule)
        (2, 600, 14, 2, 99),  # more programs than H blocks: clamped
    ],
)
@pytest.mark.parametrize("norm", [True, False])
def test_fused_router_matches_reference(interp_device, T, H, E, K, split, norm):
    from moecarve.kernels.ops.reference import sigmoid_topk_reference
    from moecarve.kernels.ops.router import sigmoid_topk

    g = torch.Generator().manual_seed(T * H + E)
    x, w, bias = (
        torch.randn(T, H, generator=g),
        torch.randn(E, H, generator=g) / H**0.5,
        torch.rand(E, generator=g) * 0.1,
    )
    idx, wts = sigmoid_topk(x, w, bias, K, norm, 2.0, split=split)
    ref_idx, ref_wts = sigmoid_topk_reference(x, w, bias, K, norm, 2.0)
    order, ref_order = idx.long().sort(-1), ref_idx.sort(-1)  # top-k sets, in any order
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(wts.gather(1, order.indices), ref_wts.gather(1, ref_order.indices))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64, 300])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split,norm", [(None, True), (1, True), (3, False)])
def test_fused_router_7b_shapes_cuda(cuda_device, T, weight_dtype, split, norm):
    """S2A2E16 and S2A4E32 routers at hidden 4096; float32 weights as transformers 5.25 loads them
    (5.17 loads them in the model's dtype)."""
    from moecarve.kernels.ops.reference import sigmoid_topk_reference
    from moecarve.kernels.ops.router import sigmoid_topk

    g = torch.Generator(cuda_device).manual_seed(T)
    for E, K in ((14, 2), (30, 4)):
        x = torch.randn(T, 4096, generator=g, device=cuda_device, dtype=torch.bfloat16)
        w = (torch.randn(E, 4096, generator=g, device=cuda_device) * 0.02).to(weight_dtype)
        bias = torch.rand(E, generator=g, device=cuda_device) * 0.01
        idx, wts = sigmoid_topk(x, w, bias, K, norm, float(K), split=split)
        ref_idx, ref_wts = sigmoid_topk_reference(x, w, bias, K, norm, float(K))
        order, ref_order = idx.long().sort(-1), ref_idx.sort(-1)
        assert torch.equal(order.values, ref_order.values)
        torch.testing.assert_close(wts.gather(1, order.indices), ref_wts.gather(1, ref_order.indices))


def test_fused_router_reads_strided_inputs_correctly(interp_device):
    """A transposed weight or a column slice of the hidden states gives the reference's routing."""
    from moecarve.kernels.ops.reference import sigmoid_topk_reference
    from moecarve.kernels.ops.router import sigmoid_topk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=g).T  # [3, 80], column stride 3
    w = torch.randn(80, 6, generator=g).T  # [6, 80], column stride 6
    bias = torch.rand(6, generator=g) * 0.1
    idx, wts = sigmoid_topk(x, w, bias, 2, True, 1.0, split=2)
    ref_idx, ref_wts = sigmoid_topk_reference(x, w, bias, 2, True, 1.0)
    order, ref_order = idx.long().sort(-1), ref_idx.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(wts.gather(1, order.indices), ref_wts.gather(1, ref_order.indices))


@pytest.mark.parametrize("top_k", [0, 6])
def test_fused_router_refuses_a_top_k_it_cannot_pick(interp_device, top_k):
    from moecarve.kernels.ops.router import sigmoid_topk

    with pytest.raises(ValueError, match="top_k must be between 1 and the 5 routed experts"):
        sigmoid_topk(torch.randn(2, 40), torch.randn(5, 40), torch.zeros(5), top_k, True, 1.0)


@pytest.mark.parametrize(
    "tokens,split,expected",
    [(1, None, (16, 256)), (64, None, (16, 256)), (128, None, (8, 512)), (300, None, (3, 1536)),
     (4096, None, (1, 4096)), (1, 3, (3, 1536)), (1, 0, (1, 4096))],
)  # fmt: skip
def test_router_split_spreads_small_batches_over_h(tokens, split, expected):
    """H 4096 in 16 blocks of 256 (14 experts): decode batches take one block per program, large ones
    one program per token."""
    from moecarve.kernels.ops.router import router_split

    assert router_split(tokens, 4096, 14, split) == expected


@pytest.mark.parametrize("use_dot", [False, None], ids=["fma", "fma-up-to-4-tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fma_reductions_match_reference_interpreted(interp_device, use_dot, dtype):
    """The decode kernels' FMA reductions (use_dot False, or None: FMA up to 4 tokens, dot above)."""
    from moecarve.kernels.ops.configs import DecodeConfig

    tiles = DecodeConfig(block_i=16, block_h=32, block_n=16, block_k=32, use_dot=use_dot)
    for tokens in (1, 5):
        check(Case(tokens, 48, 24, 5, 2, 40), dtype, interp_device, "decode", decode_config=tiles)
