"""Does torch's varlen_attn accept fewer kv heads without an enable_gqa flag (torch 2.10-2.11)? Compares against
repeated kv heads, forward and backward (device machine)."""
import torch
from torch.nn.attention.varlen import varlen_attn

torch.manual_seed(0)
cu = torch.tensor([0, 5, 45, 46, 80], dtype=torch.int32, device="cuda")
q = torch.randn(80, 14, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(80, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
ref = varlen_attn(q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1), cu, cu, 40, 40)
gr = torch.autograd.grad(ref.float().pow(2).sum(), (q, k, v))
try:
    out = varlen_attn(q, k, v, cu, cu, 40, 40)
    g = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
    print("native GQA: max diff out", (out - ref).abs().max().item(), "grads", [(a - b).abs().max().item() for a, b in zip(g, gr)])
except Exception as e:  # noqa: BLE001
    print("native GQA fails:", type(e).__name__, str(e)[:300])
