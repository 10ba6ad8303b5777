"""K independent 3-layer MLPs applied region by region: TADA's region discriminators G_d^k (eq. 2).

Region k of every image goes through its own MLP C -> H -> H -> 1 (weights not shared across
regions), so the K weight matrices are stacked as [K, C, H] and each layer is one grouped GEMM.

Triton backend. Every launch covers all K groups at once on a (group, row tile, column tile) grid;
operands are cast to the activations' dtype (fp32, or bf16/fp16 on the tensor cores' 16-bit path,
so fp32 master weights work with bf16 activations) and every product accumulates in fp32.

  forward   1. a1 = drop(relu(x[:, k] @ w1[k] + b1[k]))                  stored [K, B, H]
            2. layer 2 the same way, but its epilogue folds in the H -> 1 projection: column tile j
               writes partial[j, b, k] = drop(relu(a1 @ w2 + b2))[:, tile j] . w3[k, tile j]
               (+ b3 on tile 0), and logits = partial.sum(0). Layer 2's activations never reach
               memory, and the sum over tiles is deterministic where atomics would not be.
  backward  1. recompute layer 2 tile by tile: dz2 = g * w3 * drop'(relu'(z2)), and per row tile
               the dw3 partial sums (reduced like the forward's)
            2. dw2 = a1^T dz2 with db2 reduced in the same kernel     3. dz1 = (dz2 w2^T) * drop'(relu'(z1))
            4. dw1 = x^T dz1 with db1 likewise                        5. dx = dz1 w1^T
Saved for backward: x (the caller's view, no copy), the weights, b2 and a1 only.

Dropout keeps unit n of region k of image b in layer l (1 or 2) when
tl.rand(2 * seed + l - 1, (k * B + b) * H + n) >= p and scales it by 1 / (1 - p). No mask is stored:
layer 2's is recomputed from its seed, and layer 1's derivative is read off a1 (a1 > 0 exactly when
the unit was both active and kept). The eager backend draws its masks with torch instead, so the two
backends agree exactly only without dropout.

x is read through its strides, so the channels-last view of the backbone's map
(f.flatten(2).transpose(1, 2)) costs no copy, and dx comes back with x's strides. Any other layout
(an NCHW map's view strides C by H*W, which would make every load scalar) is first copied contiguous.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import interpreting, operand_dtype, resolve_backend, storage_dtype

# Triton specialises integer arguments on their value (== 1, divisible by 16) and width; a dropout seed
# that did so would compile a new kernel for many new seeds in the middle of training. The seed is
# therefore not specialised, and kept below 2**30 so that 2 * seed + 1 always passes as an int32.
_SEED_RANGE = 2**30


def grouped_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    *,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    seed: int | None = None,
) -> Tensor:
    """logit[b, k] = relu(relu(x[b,k] @ w1[k] + b1[k]) @ w2[k] + b2[k]) @ w3[k] + b3[k].

    x [B, K, C] with any strides (a channels-last view of the feature map is the intended input),
    w1 [K, C, H], b1 [K, H], w2 [K, H, H], b2 [K, H], w3 [K, H], b3 [K]. Returns [B, K] fp32 logits.
    When `training`, inverted dropout with probability `dropout` follows each ReLU; `seed` fixes its
    masks (None draws them from the global torch RNG, like nn.Dropout).
    """
    _check_shapes(x, w1, b1, w2, b2, w3, b3)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"grouped_mlp: dropout must be in [0, 1), got {dropout}")
    drop = dropout if training else 0.0
    if resolve_backend(backend, x.device) == "triton":
        if drop > 0.0 and seed is None:
            # From the global CPU generator, which checkpoints save and restore: resumed runs redraw
            # the same masks, and no GPU sync is needed to read the seed.
            seed = int(torch.randint(_SEED_RANGE, (1,)))
        if x.stride(2) != 1:
            # An NCHW feature map's [B, K, C] view strides C by H*W: the tiles' loads would be scalar.
            # One copy contiguous in C costs less than that, and autograd returns dx in x's layout.
            x = x.contiguous()
        return _GroupedMLP.apply(x, w1, b1, w2, b2, w3, b3, drop, (seed or 0) % _SEED_RANGE)
    return _grouped_mlp_eager(x, w1, b1, w2, b2, w3, b3, drop, seed)


# -- eager reference --------------------------------------------------------------------------


def _grouped_mlp_eager(x, w1, b1, w2, b2, w3, b3, p: float, seed: int | None) -> Tensor:
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
    # The fused kernels' numerics: 16-bit activations keep their dtype (the batched matmuls accumulate
    # in fp32 and round their output), anything else runs in fp32. Upcasting bf16 weights instead
    # would copy all K * (C * H + H * H) of them to fp32 in every forward and cast their gradients back.
    compute = storage_dtype(x.dtype)
    # [B, K, C] -> [K, B, C]: region k becomes batch entry k of the batched matmuls.
    regions = x.to(compute).transpose(0, 1)
    hidden = torch.baddbmm(b1.to(compute).unsqueeze(1), regions, w1.to(compute)).relu()
    hidden = _dropout(hidden, p, generator)
    hidden = torch.baddbmm(b2.to(compute).unsqueeze(1), hidden, w2.to(compute)).relu()
    hidden = _dropout(hidden, p, generator)
    logits = torch.baddbmm(b3.to(compute).view(-1, 1, 1), hidden, w3.to(compute).unsqueeze(2))  # [K, B, 1]
    return logits.squeeze(2).transpose(0, 1).float().contiguous()


def _dropout(hidden: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    # Written out rather than F.dropout because F.dropout cannot take a generator for seeded masks.
    if p == 0.0:
        return hidden
    keep = torch.empty_like(hidden).bernoulli_(1.0 - p, generator=generator)
    return hidden * keep / (1.0 - p)


# -- Triton kernels ---------------------------------------------------------------------------


@triton.jit
def _dot(acc, a, b, OPERAND: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in OPERAND precision. UPCAST (the interpreter) multiplies in fp32 after the cast,
    because the interpreter gets 16-bit tl.dot products wrong; the rounding to OPERAND stays."""
    a = a.to(OPERAND)
    b = b.to(OPERAND)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # fp32 operands: three TF32 products, about fp32 accuracy on the tensor cores.
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _dense_relu_dropout(
    in_ptr, in_sk, in_sb, in_sc, w_ptr, bias_ptr, k, rows, cols, B, C_IN, H, seed, p, scale,
    DROPOUT: tl.constexpr, OPERAND: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M rows, BLOCK_N units] tile of drop(relu(in[k] @ w[k] + bias[k])) in fp32, and the
    tile where it is nonzero (the ReLU-and-dropout derivative is `scale` there, 0 elsewhere)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    in_rows = in_ptr + k * in_sk + rows[:, None] * in_sb
    w_cols = w_ptr + k * C_IN * H + cols[None, :]
    for c0 in range(0, C_IN, BLOCK_K):
        inner = c0 + tl.arange(0, BLOCK_K)
        a = tl.load(in_rows + inner[None, :] * in_sc, mask=(rows[:, None] < B) & (inner[None, :] < C_IN), other=0.0)
        w = tl.load(w_cols + inner[:, None] * H, mask=(inner[:, None] < C_IN) & (cols[None, :] < H), other=0.0)
        acc = _dot(acc, a, w, OPERAND, UPCAST)
    z = acc + tl.load(bias_ptr + k * H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    active = z > 0.0
    if DROPOUT:
        active = active & (tl.rand(seed, (k * B + rows[:, None]) * H + cols[None, :]) >= p)
    return tl.where(active, z * scale, 0.0), active


@triton.jit(do_not_specialize=["seed"])
def _layer_forward_kernel(
    in_ptr, in_sk, in_sb, in_sc, w_ptr, bias_ptr, out_ptr, proj_ptr, proj_bias_ptr,
    B, K, C_IN, H, seed, p, scale,
    PROJECT: tl.constexpr, DROPOUT: tl.constexpr, OPERAND: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A layer's tile. PROJECT: write its share of the H -> 1 projection to out [n_col_tiles, B, K];
    otherwise write the activations to out [K, B, H]."""
    k = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    act, _ = _dense_relu_dropout(
        in_ptr, in_sk, in_sb, in_sc, w_ptr, bias_ptr, k, rows, cols, B, C_IN, H, seed, p, scale,
        DROPOUT, OPERAND, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if PROJECT:
        w3 = tl.load(proj_ptr + k * H + cols, mask=cols < H, other=0.0).to(tl.float32)
        partial = tl.sum(act * w3[None, :], axis=1)
        partial += tl.where(pid_n == 0, tl.load(proj_bias_ptr + k).to(tl.float32), 0.0)
        tl.store(out_ptr + (pid_n * B + rows) * K + k, partial, mask=rows < B)
    else:
        mask = (rows[:, None] < B) & (cols[None, :] < H)
        out = out_ptr + (k * B + rows[:, None]) * H + cols[None, :]
        tl.store(out, act.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _projection_backward_kernel(
    a1_ptr, w2_ptr, b2_ptr, w3_ptr, grad_ptr, dz2_ptr, dw3_partial_ptr,
    B, K, H, seed, p, scale,
    DROPOUT: tl.constexpr, OPERAND: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Recompute a layer-2 tile, then dz2 = g w3 drop'(relu'(z2)) into [K, B, H] and this row tile's
    sum of g * a2 (dw3's share) into dw3_partial [n_row_tiles, K, H]."""
    k = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    act, active = _dense_relu_dropout(
        a1_ptr, B * H, H, 1, w2_ptr, b2_ptr, k, rows, cols, B, H, H, seed, p, scale,
        DROPOUT, OPERAND, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    g = tl.load(grad_ptr + rows * K + k, mask=rows < B, other=0.0)
    w3 = tl.load(w3_ptr + k * H + cols, mask=cols < H, other=0.0).to(tl.float32)
    dz2 = tl.where(active, g[:, None] * w3[None, :] * scale, 0.0)
    mask = (rows[:, None] < B) & (cols[None, :] < H)
    tl.store(dz2_ptr + (k * B + rows[:, None]) * H + cols[None, :], dz2.to(dz2_ptr.dtype.element_ty), mask=mask)
    tl.store(dw3_partial_ptr + (pid_m * K + k) * H + cols, tl.sum(g[:, None] * act, axis=0), mask=cols < H)


@triton.jit
def _weight_grad_kernel(
    a_ptr, a_sk, a_sb, a_sc, dz_ptr, dw_ptr, db_ptr, B, C_IN, H,
    OPERAND: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[k] = a[k]^T dz[k] ([C_IN, H], summed over the batch); the first row tile also writes
    db[k] = dz[k] summed over the batch, from the dz tiles it loads anyway."""
    k = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    inputs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_K):
        batch = b0 + tl.arange(0, BLOCK_K)
        a_t = tl.load(
            a_ptr + k * a_sk + batch[None, :] * a_sb + inputs[:, None] * a_sc,
            mask=(inputs[:, None] < C_IN) & (batch[None, :] < B), other=0.0,
        )
        dz = tl.load(
            dz_ptr + (k * B + batch[:, None]) * H + cols[None, :],
            mask=(batch[:, None] < B) & (cols[None, :] < H), other=0.0,
        )
        acc = _dot(acc, a_t, dz, OPERAND, UPCAST)
        bias_acc += tl.sum(dz.to(tl.float32), axis=0)
    mask = (inputs[:, None] < C_IN) & (cols[None, :] < H)
    tl.store(dw_ptr + (k * C_IN + inputs[:, None]) * H + cols[None, :], acc.to(dw_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + k * H + cols, bias_acc.to(db_ptr.dtype.element_ty), mask=(cols < H) & (pid_m == 0))


@triton.jit
def _input_grad_kernel(
    dz_ptr, w_ptr, act_ptr, out_ptr, out_sk, out_sb, out_sc, B, C_IN, H, scale,
    GATE: tl.constexpr, OPERAND: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[:, k] = dz[k] w[k]^T ([B, C_IN]); GATE multiplies by the derivative of the ReLU and
    dropout that produced act [K, B, C_IN] (scale where act > 0, else 0)."""
    k = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    inputs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, H, BLOCK_K):
        units = n0 + tl.arange(0, BLOCK_K)
        dz = tl.load(
            dz_ptr + (k * B + rows[:, None]) * H + units[None, :],
            mask=(rows[:, None] < B) & (units[None, :] < H), other=0.0,
        )
        w_t = tl.load(
            w_ptr + (k * C_IN + inputs[None, :]) * H + units[:, None],
            mask=(inputs[None, :] < C_IN) & (units[:, None] < H), other=0.0,
        )
        acc = _dot(acc, dz, w_t, OPERAND, UPCAST)
    mask = (rows[:, None] < B) & (inputs[None, :] < C_IN)
    if GATE:
        act = tl.load(act_ptr + (k * B + rows[:, None]) * C_IN + inputs[None, :], mask=mask, other=0.0)
        acc = tl.where(act > 0.0, acc * scale, 0.0)
    out = out_ptr + k * out_sk + rows[:, None] * out_sb + inputs[None, :] * out_sc
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# -- launchers and autograd -------------------------------------------------------------------


def _launch_settings(dtype: torch.dtype) -> dict:
    """Tile sizes, the dtype tl.dot multiplies in, and whether to upcast for the interpreter.

    On the GPU: 64-row tiles cover a per-GPU batch of 32 + 32 images in one tile, so every weight
    (154M of them for ResNet-50) is read once per layer, which is what bounds these layers; 64-wide
    column tiles give K * H / 64 = 784 programs for K = 49, H = 1024, several per SM on an H200.
    The interpreter pays per program, not per element, so it gets 32-wide tiles: few programs, yet
    the tests' odd shapes still span several tiles and end in partial ones.
    """
    upcast = interpreting()
    if upcast:
        blocks = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    else:
        blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64 if dtype in (torch.bfloat16, torch.float16) else 32)
        blocks.update(num_warps=4, num_stages=3)
    return dict(OPERAND=operand_dtype(dtype), UPCAST=upcast, **blocks)


def _layer_forward(inputs, strides, w, bias, proj, proj_bias, out, B, K, seed, p, settings):
    C_in, H = w.shape[1], w.shape[2]
    grid = (K, triton.cdiv(B, settings["BLOCK_M"]), triton.cdiv(H, settings["BLOCK_N"]))
    _layer_forward_kernel[grid](
        inputs, *strides, w, bias, out, proj, proj_bias, B, K, C_in, H, seed, p, 1.0 / (1.0 - p),
        PROJECT=proj is not None, DROPOUT=p > 0.0, **settings,
    )


def _weight_grad(inputs, strides, dz, dw, db, B, settings):
    K, C_in, H = dw.shape
    grid = (K, triton.cdiv(C_in, settings["BLOCK_M"]), triton.cdiv(H, settings["BLOCK_N"]))
    _weight_grad_kernel[grid](inputs, *strides, dz, dw, db, B, C_in, H, **settings)


def _input_grad(dz, w, act, out, strides, B, p, settings):
    K, C_in, H = w.shape
    grid = (K, triton.cdiv(B, settings["BLOCK_M"]), triton.cdiv(C_in, settings["BLOCK_N"]))
    _input_grad_kernel[grid](
        dz, w, dz if act is None else act, out, *strides, B, C_in, H, 1.0 / (1.0 - p),
        GATE=act is not None, **settings,
    )


def _region_strides(x: Tensor) -> tuple[int, int, int]:
    """Strides of x [B, K, C] in the kernels' order (group, row, channel)."""
    return x.stride(1), x.stride(0), x.stride(2)


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, p: float, seed: int):
        B, K, _ = x.shape
        H = w1.shape[2]
        w1, b1, w2, b2, w3, b3 = (t.contiguous() for t in (w1, b1, w2, b2, w3, b3))
        settings = _launch_settings(x.dtype)
        a1 = torch.empty(K, B, H, device=x.device, dtype=storage_dtype(x.dtype))
        _layer_forward(x, _region_strides(x), w1, b1, None, None, a1, B, K, 2 * seed, p, settings)
        partial = torch.empty(triton.cdiv(H, settings["BLOCK_N"]), B, K, device=x.device, dtype=torch.float32)
        _layer_forward(a1, (B * H, H, 1), w2, b2, w3, b3, partial, B, K, 2 * seed + 1, p, settings)
        ctx.save_for_backward(x, w1, w2, b2, w3, a1)
        ctx.p, ctx.seed, ctx.bias_dtypes = p, seed, (b1.dtype, b3.dtype)
        return partial.sum(0)

    @staticmethod
    def backward(ctx, grad_logits):
        x, w1, w2, b2, w3, a1 = ctx.saved_tensors
        p, seed = ctx.p, ctx.seed
        B, K, _ = x.shape
        H = w1.shape[2]
        settings = _launch_settings(x.dtype)
        grad_logits = grad_logits.float().contiguous()

        dz2 = torch.empty_like(a1)
        row_tiles = triton.cdiv(B, settings["BLOCK_M"])
        dw3_partial = torch.empty(row_tiles, K, H, device=x.device, dtype=torch.float32)
        _projection_backward_kernel[(K, row_tiles, triton.cdiv(H, settings["BLOCK_N"]))](
            a1, w2, b2, w3, grad_logits, dz2, dw3_partial, B, K, H, 2 * seed + 1, p, 1.0 / (1.0 - p),
            DROPOUT=p > 0.0, **settings,
        )
        dw3 = dw3_partial.sum(0).to(w3.dtype)
        db3 = grad_logits.sum(0).to(ctx.bias_dtypes[1])

        dw2, db2 = torch.empty_like(w2), torch.empty_like(b2)
        _weight_grad(a1, (B * H, H, 1), dz2, dw2, db2, B, settings)
        dz1 = torch.empty_like(a1)
        _input_grad(dz2, w2, a1, dz1, (B * H, H, 1), B, p, settings)

        dw1, db1 = torch.empty_like(w1), torch.empty(K, H, device=x.device, dtype=ctx.bias_dtypes[0])
        _weight_grad(x, _region_strides(x), dz1, dw1, db1, B, settings)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)  # x's strides: a channels-last view gets a channels-last gradient
            _input_grad(dz1, w1, None, dx, _region_strides(dx), B, p, settings)
        return dx, dw1, db1, dw2, db2, dw3, db3, None, None


def _check_shapes(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"grouped_mlp: x must be [B, K, C], got {list(x.shape)}")
    _, K, C = x.shape
    H = w1.shape[2] if w1.dim() == 3 else "H"
    expected = {
        "w1": ("[K, C, H]", w1, (K, C, H)),
        "b1": ("[K, H]", b1, (K, H)),
        "w2": ("[K, H, H]", w2, (K, H, H)),
        "b2": ("[K, H]", b2, (K, H)),
        "w3": ("[K, H]", w3, (K, H)),
        "b3": ("[K]", b3, (K,)),
    }
    for name, (layout, tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            wanted = "[" + ", ".join(map(str, shape)) + "]"
            raise ValueError(f"grouped_mlp: {name} must be {layout} = {wanted}, got {list(tensor.shape)}")
