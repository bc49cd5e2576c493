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


def all_reduce_sum(t):
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(t)
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
