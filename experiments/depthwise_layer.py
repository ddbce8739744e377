"""Per-layer timings behind the CPU depthwise backward (issue #16, BENCHMARKS.md): torch's depthwise 7x7
forward / forward+backward, and the grad_input / grad_weight candidates, at the three levels of the fashion-cpu
ConvNeXt (batch 64), fp32 and bf16, NCHW and NHWC; medians of 5 calls. Run it with nothing else on the machine.

    python experiments/depthwise_layer.py
"""
import torch, time, torch.nn.functional as F
torch.manual_seed(0)
def bench(f, n=5):
    f(); f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return sorted(ts)[n//2]*1e3
for (B,C,H) in [(64,40,32),(64,80,16),(64,160,8)]:
    for dt in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            x=torch.randn(B,C,H,H,dtype=dt); w=torch.randn(C,1,7,7,dtype=dt, requires_grad=True)
            if cl: x=x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            y=F.conv2d(x,w,padding=3,groups=C); g=torch.randn_like(y)
            fwd=bench(lambda: F.conv2d(x,w,padding=3,groups=C))
            def fb():
                y=F.conv2d(x,w,padding=3,groups=C); y.backward(g)
            fbt=bench(fb)
            # pointwise reference: 1x1 conv C->2C
            w2=torch.randn(2*C,C,1,1,dtype=dt,requires_grad=True)
            def pw():
                y=F.conv2d(x,w2); y.backward(torch.ones_like(y))
            print(B,C,H,dt,'nhwc' if cl else 'nchw', f"fwd {fwd:.1f} fwd+bwd {fbt:.1f} pw fwd+bwd {bench(pw):.1f}")

k=7;p=3
for (B,C,H) in [(64,40,32),(64,80,16),(64,160,8)]:
    for dt in (torch.float32, torch.bfloat16):
      for cl in (False,True):
        mf = torch.channels_last if cl else torch.contiguous_format
        x=torch.randn(B,C,H,H,dtype=dt).contiguous(memory_format=mf); w=torch.randn(C,1,k,k,dtype=dt)
        g=torch.randn(B,C,H,H,dtype=dt).contiguous(memory_format=mf)
        # reference grads
        xr=x.clone().requires_grad_(); wr=w.clone().requires_grad_()
        F.conv2d(xr,wr,padding=p,groups=C).backward(g)
        gi = lambda: F.conv2d(g, w.flip(-1,-2), padding=p, groups=C)
        e1=(gi()-xr.grad).abs().max().item()
        def gw_bigkernel():
            xp=F.pad(x,(p,p,p,p)).reshape(1,B*C,H+2*p,H+2*p)
            return F.conv2d(xp, g.reshape(B*C,1,H,H), groups=B*C).reshape(B,C,k,k).sum(0).unsqueeze(1)
        def gw_bigkernel2():
            # channels = C, batch folded into... input (B, C, Hp, Wp) -> treat as (1, C*B?) 
            xp=F.pad(x,(p,p,p,p)).transpose(0,1).reshape(1,C*B,H+2*p,H+2*p)
            gg=g.transpose(0,1).reshape(C, B, H, H)
            return F.conv2d(xp, gg, groups=C).reshape(C,1,k,k)
        def gw_bmm():
            xp=F.pad(x,(p,p,p,p))  # B C Hp Wp
            out=torch.empty(C,k,k,dtype=torch.float32)
            gg=g.permute(1,0,2,3).reshape(C,B*H,H).transpose(1,2) # C, W, B*H
            for ky in range(k):
                xs=xp[:,:,ky:ky+H,:].permute(1,0,2,3).reshape(C,B*H,H+2*p)  # C, B*H, Wp
                M=torch.bmm(gg, xs)  # C, W, Wp
                for kx in range(k):
                    out[:,ky,kx]=M.diagonal(offset=kx,dim1=1,dim2=2).float().sum(-1)
            return out.unsqueeze(1)
        res=[]
        for name,f in [("bigk",gw_bigkernel),("bigk2",gw_bigkernel2),("bmm",gw_bmm)]:
            err=(f().float()-wr.grad.float()).abs().max().item()/wr.grad.float().abs().max().item()
            res.append(f"{name} {bench(f):.1f}ms relerr {err:.1e}")
        print(B,C,H,dt,cl, f"gi {bench(gi):.1f} err {e1:.1e} |", " | ".join(res))
