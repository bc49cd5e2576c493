"""The activation-sized kernels of the CE block (blocks/ce.py): Newton-Schulz inverse square
root, centred per-sample moments and the per-sample mixing matmul, as autograd Functions whose
backward passes reuse one transposed centred copy of the input (see the CE module doc)."""
import torch


def newton_isqrt(sigma_n, iters):
    """Newton-Schulz iterate P_T ~ sigma_n^{-1/2} from P_0 = I for a batch of trace-1 SPD matrices."""
    d = sigma_n.shape[-1]
    eye = torch.eye(d, dtype=sigma_n.dtype, device=sigma_n.device).expand_as(sigma_n)
    if iters <= 0:
        return eye.clone()
    p = 1.5 * eye - 0.5 * sigma_n  # first step from P_0 = I, where P_0^3 = I
    for _ in range(iters - 1):
        p = torch.baddbmm(p, torch.bmm(torch.bmm(p, p), p), sigma_n, beta=1.5, alpha=-0.5)
    return p


class _AllReduceSum(torch.autograd.Function):
    """SUM over the ranks of the default group, differentiable: every rank's loss depends on the sum,
    so the gradient of each rank's input is the sum of the ranks' output gradients (as in SyncBatchNorm).
    Built on the functional collectives, which torch.compile traces without a graph break (the
    deprecated ``torch.distributed.nn.functional.all_reduce`` breaks the graph at every call)."""

    @staticmethod
    def forward(ctx, t):
        return _reduce(t)

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad)


def _reduce(t):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), "sum", dist.group.WORLD))


def all_reduce_sum(t):
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(t)
    return t


class GradLink:
    """Carries Mix's gradient wrt x to CentredMoments' backward, which adds its own term in
    place and returns the sum: one activation-sized buffer and no separate accumulation pass.
    Autograd runs Mix's backward first (the statistics feed the mixing matrix)."""

    __slots__ = ("dx",)

    def __init__(self):
        self.dx = None


class CentredMoments(torch.autograd.Function):
    """Gram matrices (B, d, d) and row sums (B, d) of xc = x - shift for x (B, d, M), shift = the
    row means (constant); also returns shift and xc^T (B, M, d) (see the module doc). Statistics
    in float32 (float64 for float64 x). Backward: d/dx = (dG + dG^T) xc + dsum 1^T, added to the
    gradient Mix left in ``link`` when there is one.
    """

    @staticmethod
    def forward(ctx, x, sdt, link=None):
        b, d, m = x.shape
        total = x.sum(2, keepdim=True, dtype=sdt)
        shift = total / m
        if torch.compiler.is_compiling():  # out= into a strided view is not traceable
            xct = torch.sub(x, shift).transpose(1, 2).contiguous()
        else:  # one pass, written straight into the transposed layout
            xct = torch.empty((b, m, d), dtype=sdt, device=x.device)
            torch.sub(x, shift, out=xct.transpose(1, 2))
        gram = torch.bmm(xct.transpose(1, 2), xct)
        sums = (total - m * shift).squeeze(2)  # the sum of xc, ~0: only its gradient matters
        ctx.mark_non_differentiable(shift, xct)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for xct
        ctx.save_for_backward(xct)
        ctx.x_dtype, ctx.link = x.dtype, link
        return gram, sums, shift, xct

    @staticmethod
    def backward(ctx, dgram, dsum, _dshift, _dxct):
        if not ctx.needs_input_grad[0]:  # then Mix left no gradient in the link either
            return None, None, None
        (xct,) = ctx.saved_tensors
        b, m, d = xct.shape
        link, grad = ctx.link, None
        if link is not None:
            grad, link.dx = link.dx, None
        if dgram is not None:
            sym = dgram + dgram.transpose(1, 2)
            if grad is not None and grad.dtype == xct.dtype:
                grad.baddbmm_(sym, xct.transpose(1, 2))
            elif grad is not None:
                grad = grad + torch.bmm(sym, xct.transpose(1, 2)).to(grad.dtype)
            else:
                grad = torch.bmm(sym, xct.transpose(1, 2))
        if dsum is not None:
            grad = dsum.unsqueeze(2).expand(b, d, m).clone() if grad is None else grad.add_(dsum.unsqueeze(2))
        return (None if grad is None else grad.to(ctx.x_dtype)), None, None


class Mix(torch.autograd.Function):
    """out = W x for W (B, d, d), x (B, d, M); backward uses xc^T and shift of CentredMoments
    instead of keeping x: dW = dout (xc^T + 1 shift^T). With a ``link`` the gradient wrt x is
    handed to CentredMoments' backward instead of being returned."""

    @staticmethod
    def forward(ctx, x, mix, xct, shift, link=None):
        ctx.save_for_backward(mix, xct, shift)
        ctx.link = link if ctx.needs_input_grad[1] else None  # else CentredMoments gets no backward
        return torch.bmm(mix.to(x.dtype), x)

    @staticmethod
    def backward(ctx, dout):
        mix, xct, shift = ctx.saved_tensors
        dout, dx, dmix = dout.contiguous(), None, None  # an expanded dout would make bmm loop over B
        if ctx.needs_input_grad[0]:
            dx = torch.bmm(mix.transpose(1, 2).to(dout.dtype), dout)
            if ctx.link is not None:
                ctx.link.dx, dx = dx, None
        if ctx.needs_input_grad[1]:
            d32 = dout.to(xct.dtype)
            dmix = torch.baddbmm(d32.sum(2, keepdim=True) * shift.transpose(1, 2), d32, xct)
        return dx, dmix, None, None, None


def variance_from_sums(total, sumsq, count):
    """Variance from (centred) sums: unbiased like torch.var, biased when count == 1; never negative."""
    return ((sumsq - total * total / count) / max(count - 1, 1)).clamp_min(0)


# ----------------------------------------------------------------------------- channels_last
# In channels_last memory, x viewed as (n, hw, c) is contiguous and, with c = g * d, the rows of
# group k over all n * hw positions form a (n * hw, d) matrix of row stride c: a strided batch over
# the g groups that bmm reads and writes in place. The kernels below work on that layout directly,
# so CE makes no NCHW copy of its input, output or their gradients.

def _traceable():
    """True when out= into strided views must be avoided (compile, export, jit/ONNX tracing)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def group_rows(t, g):
    """(n, hw, c) -> (g, n * hw, d): the rows of each group of d channels (a view)."""
    n, hw, c = t.shape
    return t.view(n * hw, g, c // g).transpose(0, 1)


def group_matmul(x3, mat, g):
    """(n, hw, c) x, (g, d, d) mat -> (n, hw, c) with each group's rows times mat^T (x's dtype)."""
    mat_t = mat.transpose(1, 2).to(x3.dtype)
    if _traceable() or (torch.is_grad_enabled() and (x3.requires_grad or mat_t.requires_grad)):  # out= has no autograd
        n, hw, c = x3.shape
        return torch.bmm(group_rows(x3, g), mat_t).transpose(0, 1).reshape(n, hw, c)
    out = torch.empty_like(x3, memory_format=torch.contiguous_format)
    torch.bmm(group_rows(x3, g), mat_t, out=group_rows(out, g))
    return out


def sample_group_matmul(x3, mats, out):
    """``out`` (n, hw, c) = each sample's rows of each group of x3 times that sample's matrix transposed,
    for mats (n, g, d, d): one strided bmm per sample, written in place. No autograd; on CPU this beats a
    shared matmul plus an elementwise pass for the per-sample diagonal (see ``per_sample_kernels``)."""
    g = mats.shape[1]
    mats_t = mats.transpose(2, 3).to(x3.dtype)
    for i in range(x3.shape[0]):
        if x3.shape[2] >= 1024:  # rows >= 1024 apart: a strided out= is 2x slower than a contiguous result + copy
            group_rows(out[i:i + 1], g).copy_(torch.bmm(group_rows(x3[i:i + 1], g), mats_t[i]))
        else:
            torch.bmm(group_rows(x3[i:i + 1], g), mats_t[i], out=group_rows(out[i:i + 1], g))
    return out


def sample_grams(a3, b3, g):
    """(n, g, d, d) per-sample, per-group a^T b of the rows of a3, b3 (n, hw, c): one strided bmm per sample."""
    n, _, c = a3.shape
    out = torch.empty((n, g, c // g, c // g), dtype=a3.dtype, device=a3.device)
    for i in range(n):
        torch.bmm(group_rows(a3[i:i + 1], g).transpose(1, 2), group_rows(b3[i:i + 1], g), out=out[i])
    return out


def loops_over_samples(x):
    """Whether the channels_last kernels loop over samples: on CPU in eager mode. One strided bmm per
    sample then applies (or differentiates) each sample's whole matrix A + diag(gain_n), which saves the
    activation-sized elementwise passes of the diagonal terms. Traced graphs keep the batch dimension
    symbolic, and GPUs prefer one batched call, so they use the batched form."""
    return x.device.type == "cpu" and not _traceable()


def sample_mats(bd, gain):
    """(n, g, d, d) per-sample matrices A + diag(gain_n) from A (g, d, d) and gain (n, c)."""
    g, d = bd.shape[0], bd.shape[1]
    return bd + torch.diag_embed(gain.view(-1, g, d).to(bd.dtype))


def per_sample_kernels(x):
    """Whether CE's channels_last eval may use ``sample_group_matmul`` (out= has no autograd)."""
    return loops_over_samples(x) and not torch.is_grad_enabled()


def mix_nhwc(x3, bd, gain):
    """A x + gain * x per group for x (n, hw, c), A (g, d, d), gain (n, c), in x's dtype."""
    out = group_matmul(x3, bd, bd.shape[0])
    gain = gain.unsqueeze(1).to(x3.dtype)
    if _traceable() or (torch.is_grad_enabled() and (out.requires_grad or gain.requires_grad)):
        return torch.addcmul(out, x3, gain)
    return out.addcmul_(x3, gain)  # a fresh tensor of ours: no view, no autograd


class CentredMomentsNHWC(torch.autograd.Function):
    """CentredMoments for x (n, hw, c) in channels_last memory: the scatter of xc = x - shift summed
    over samples per group (g, d, d), per-sample sums of squares (n, c) and sums (n, c) of xc;
    also shift (n, 1, c) and xc (n, hw, c) in the statistics dtype. Backward:
    d/dx = xc (dS + dS^T) per group + 2 xc dsumsq + dsum, added to the gradient Mix left in ``link``.
    """

    @staticmethod
    def forward(ctx, x3, g, sdt, link=None):
        hw = x3.shape[1]
        total = x3.sum(1, keepdim=True, dtype=sdt)
        shift = total / hw
        xc = torch.sub(x3, shift)  # promoted to the statistics dtype
        ctx.loop = loops_over_samples(x3)
        if ctx.loop:  # per-sample grams: their diagonals are the sums of squares, no squared copy
            grams = sample_grams(xc, xc, g)
            scatter, sumsq = grams.sum(0), grams.diagonal(dim1=2, dim2=3).reshape(grams.shape[0], -1)
        else:
            rows = group_rows(xc, g)
            scatter = torch.bmm(rows.transpose(1, 2), rows)
            sumsq = xc.square().sum(1)  # vector_norm over a non-inner dim is ~10x slower on CPU
        sums = (total - hw * shift).squeeze(1)  # ~0: only its gradient matters
        ctx.mark_non_differentiable(shift, xc)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xc)
        ctx.g, ctx.x_dtype, ctx.link = g, x3.dtype, link
        return scatter, sumsq, sums, shift, xc

    @staticmethod
    def backward(ctx, dscatter, dsumsq, dsum, _dshift, _dxc):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (xc,) = ctx.saved_tensors
        g, link, grad = ctx.g, ctx.link, None
        if link is not None:
            grad, link.dx = link.dx, None
        if grad is None:
            grad = torch.zeros_like(xc)
        elif grad.dtype != xc.dtype:
            grad = grad.to(xc.dtype)
        # terms summed into one buffer in place (fresh activation-sized buffers cost page faults on CPU)
        if ctx.loop and (dscatter is not None or dsumsq is not None):  # one matrix per sample, diagonal included
            n, c = xc.shape[0], xc.shape[2]
            sym = (dscatter + dscatter.transpose(1, 2)).expand(n, g, c // g, c // g) if dscatter is not None \
                else xc.new_zeros(n, g, c // g, c // g)
            if dsumsq is not None:
                sym = sym + torch.diag_embed(2 * dsumsq.view(n, g, c // g))
            for i in range(n):
                group_rows(grad[i:i + 1], g).baddbmm_(group_rows(xc[i:i + 1], g), sym[i])
            dscatter = dsumsq = None
        if dscatter is not None:
            sym = dscatter + dscatter.transpose(1, 2)
            if _traceable():
                grad = grad + group_matmul(xc, sym, g)
            else:
                group_rows(grad, g).baddbmm_(group_rows(xc, g), sym)
        if dsumsq is not None:
            grad = grad.addcmul_(xc, (2 * dsumsq).unsqueeze(1))
        if dsum is not None:
            grad = grad.add_(dsum.unsqueeze(1))
        return grad.to(ctx.x_dtype), None, None, None


class MixNHWC(torch.autograd.Function):
    """out = A_k x + gain * x per group k and sample (the per-sample matrix W_n = A + diag(gain_n)) for
    x (n, hw, c) in channels_last memory, A (g, d, d), gain (n, c). Backward uses xc and shift of
    CentredMomentsNHWC instead of x: dA = sum over rows of dout^T (xc + shift),
    dgain = sum over hw of dout * (xc + shift); dx goes to ``link`` when there is one."""

    @staticmethod
    def forward(ctx, x3, bd, gain, xc, shift, link=None):
        ctx.save_for_backward(bd, gain, xc, shift)
        ctx.link = link if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) else None
        ctx.loop = loops_over_samples(x3)
        if ctx.loop:
            return sample_group_matmul(x3, sample_mats(bd, gain), torch.empty_like(x3))
        return mix_nhwc(x3, bd, gain)

    @staticmethod
    def backward(ctx, dout):
        bd, gain, xc, shift = ctx.saved_tensors
        g = bd.shape[0]
        dout = dout.contiguous()
        dx = dbd = dgain = None
        if ctx.needs_input_grad[0]:
            if ctx.loop:
                dx = sample_group_matmul(dout, sample_mats(bd, gain).transpose(2, 3), torch.empty_like(dout))
            else:
                dx = group_matmul(dout, bd.transpose(1, 2), g).addcmul_(dout, gain.unsqueeze(1).to(dout.dtype))
            if ctx.link is not None:
                ctx.link.dx, dx = dx, None
        if ctx.loop and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            # dW_n = dout_n^T (xc_n + shift_n) per sample: dA sums them, dgain_n is the diagonal
            d32 = dout.to(xc.dtype)
            n, c = d32.shape[0], d32.shape[2]
            dw = sample_grams(d32, xc, g).add_(
                (d32.sum(1).view(n, g, -1, 1) * shift.view(n, g, 1, -1)))
            dbd = dw.sum(0) if ctx.needs_input_grad[1] else None
            dgain = dw.diagonal(dim1=2, dim2=3).reshape(n, c) if ctx.needs_input_grad[2] else None
        elif ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d32 = dout.to(xc.dtype)
            dsum = d32.sum(1)                                    # (n, c)
            n, c = dsum.shape
            d = c // g
            if ctx.needs_input_grad[1]:
                rows = group_rows(d32, g)
                dbd = torch.baddbmm(torch.einsum("ngi,ngj->gij", dsum.view(n, g, d), shift.view(n, g, d)),
                                    rows.transpose(1, 2), group_rows(xc, g))
            if ctx.needs_input_grad[2]:
                dgain = (d32 * xc).sum(1) + dsum * shift.squeeze(1)
        return dx, dbd, dgain, None, None, None
