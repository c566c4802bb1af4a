import time, torch
from diffusegen.core import load_config, torch_generator
from diffusegen.training import build_unet
from diffusegen.styling import StyleNets, guided_step
from diffusegen.bench import _bench_style_networks
dev, B, S = torch.device("cuda"), 16, 256
cfg0 = load_config("paper", {"device": "cuda"})
cls_net, vgg_net, label = _bench_style_networks(cfg0, dev)
unet = build_unet(cfg0, seed=0).to(dev)
print(torch.cuda.get_device_name(), label, flush=True)
for comp in ("false", "true"):
    cfg = load_config("paper", {"device": "cuda", "compile": comp})
    nets = StyleNets(unet, cfg, cls_net, vgg_net, dev)
    diff = nets.diffusion
    g = torch.Generator().manual_seed(1)
    init = (torch.rand(B, 4, S, S, generator=g) * 2 - 1).to(dev); src = (torch.rand(B, 3, S, S, generator=g) * 2 - 1).to(dev)
    with torch.no_grad(), nets.autocast(): c_src, c_prev = nets.cls_net(src).float(), nets.cls_net(init[:, :3]).float()
    gens = [torch_generator(i, dev) for i in range(B)]
    x = diff.q_sample(init, cfg.style_start, torch.randn(init.shape, device=dev))
    i = cfg.style_start
    for k in range(5):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        x, _, c_prev, _ = guided_step(nets, x, i, init, src, c_src, c_prev, gens); i -= 1
        torch.cuda.synchronize(); dt = time.perf_counter() - t0
        print(f"compile={comp} batch={B} step {k}: {dt:.3f} s  -> {dt / B * 120:.2f} s per styled image at 120 steps", flush=True)
    print("peak GB", round(torch.cuda.max_memory_allocated() / 2**30, 1), flush=True)
