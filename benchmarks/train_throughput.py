"""Training throughput and peak memory: our trainer vs a minimal plain-diffusers loop.

SD models (tiny-sd, sd15-arch): the reference loop does what diffusers' ``examples/dreambooth/train_dreambooth.py``
does per step (full UNet fine-tune, frozen VAE and text encoder, accelerate, AdamW, constant LR, grad clipping at
1.0, torchvision transforms, a shuffled DataLoader); ours trains ``method: {name: dreambooth, adapter: full}``.

FLUX models (tiny-flux, flux-arch): the reference loop (``_flux_plain_loop.py``) does what diffusers'
``examples/dreambooth/train_dreambooth_lora_flux.py`` does per step with its defaults (peft LoRA rank 4 on the
transformer, per-step CLIP + T5 prompt encoding, VAE encode, flow-matching noise, packed latents, guidance 3.5,
AdamW lr 1e-4); ours trains ``method: {name: dreambooth, adapter: lora}`` with the family's default targets (the
script's) at the same rank, learning rate and weight decay, text embeddings encoded per step as the script does.

Both sides use the same components, images, batch, resolution and seed. Each run is a separate process, so
peak RSS is per run. The ``ours+cache`` row adds ``cache_latents`` and ``cache_text_embeddings``.

    python benchmarks/train_throughput.py                      # CPU: builtin:tiny-sd, 64 px, batch 4
    python benchmarks/train_throughput.py --model sd15-arch --resolution 512 --batch 1 --mixed-precision bf16 \
        --steps 30 --warmup 5                                   # GPU: SD-1.5 architecture, random weights
    python benchmarks/train_throughput.py --model tiny-flux    # CPU: builtin:tiny-flux, 64 px, batch 4, DreamBooth LoRA
    python benchmarks/train_throughput.py --model flux-arch --resolution 1024 --batch 1 --mixed-precision bf16 \
        --steps 20 --warmup 3                                   # GPU: FLUX.1-dev architecture, random weights

Prints steps/s, peak RSS (and on CUDA peak GPU memory and model FLOP utilisation) with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _flux_plain_loop

MODELS = ["tiny-sd", "sd15-arch", "tiny-flux", "flux-arch"]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_family(model: str) -> str:
    """The family of a built-in architecture, read from its spec without importing torch (the parent process)."""
    spec = ROOT / "t2i_personal" / "models" / "configs" / f"{model}.json"
    if not spec.is_file():
        sys.exit(f"--model {model}: no built-in architecture of that name (e.g. {', '.join(MODELS)})")
    return json.loads(spec.read_text())["family"]


def run_ours(args, data_dir: Path, out_dir: Path, cache: bool, quantize: str = "none") -> dict:
    from t2i_personal.config import TrainConfig
    from t2i_personal.training.trainer import Trainer

    if model_family(args.model) == "flux":
        from _flux_plain_loop import ADAM_WEIGHT_DECAY, LEARNING_RATE, RANK

        # the family's default LoRA targets are the FLUX script's; rank/alpha, lr and weight decay its defaults
        method = {"name": "dreambooth", "adapter": "lora", "lora": {"rank": RANK}}
        optim = {"learning_rate": LEARNING_RATE, "adam_weight_decay": ADAM_WEIGHT_DECAY}
    else:
        method = {"name": "dreambooth", "adapter": "full"}
        optim = {"learning_rate": 5e-6}
    cfg = TrainConfig.model_validate({
        "model": {"pretrained": f"builtin:{args.model}", "quantize": quantize},
        "concepts": [{"identifier": "sks", "class_noun": "dog", "instance_dir": str(data_dir)}],
        "method": method,
        "data": {"resolution": args.resolution},
        "training": {"output_dir": str(out_dir), "seed": 0, "max_train_steps": args.steps + args.warmup,
                     "train_batch_size": args.batch, **optim, "mixed_precision": args.mixed_precision,
                     "gradient_checkpointing": args.gradient_checkpointing,
                     "checkpointing_steps": 10**9, "report_to": "none", "progress_bar": False,
                     "cache_latents": cache, "cache_text_embeddings": cache},
    })
    trainer = Trainer(cfg)
    trainer.train()
    return {"step_seconds": trainer.step_seconds}


def run_reference(args, data_dir: Path) -> dict:
    if model_family(args.model) == "flux":
        from _flux_plain_loop import prepare

        loader, step, accelerator = prepare(args, data_dir)
    else:
        loader, step, accelerator = prepare_sd_reference(args, data_dir)
    return timed_steps(args, loader, step, accelerator.device)


def prepare_sd_reference(args, data_dir: Path):
    """(loader, step, accelerator) of the ``train_dreambooth.py`` loop (full UNet fine-tune)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from torchvision import transforms

    from t2i_personal.models.tiny import build_tiny  # only to build the same random components

    torch.manual_seed(0)
    comps = build_tiny(args.model)
    tokenizer, text_encoder, vae, unet = comps.tokenizer, comps.text_encoder, comps.vae, comps.unet
    noise_scheduler = DDPMScheduler.from_config(comps.scheduler.config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    tf = transforms.Compose([transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                             transforms.CenterCrop(args.resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    images = [Image.open(p).convert("RGB") for p in sorted(data_dir.glob("*.png"))]
    ids = tokenizer("a photo of sks dog", truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids[0]

    class Instances(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"pixel_values": tf(images[i]), "input_ids": ids}

    # drop_last keeps every batch full, as our endless stream does (5 images, batch 4: no 1-image batches)
    loader = torch.utils.data.DataLoader(Instances(), batch_size=args.batch, shuffle=True, drop_last=True,
                                         collate_fn=lambda ex: {"pixel_values": torch.stack([e["pixel_values"] for e in ex]),
                                                                "input_ids": torch.stack([e["input_ids"] for e in ex])})
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    def step(batch):
        with accelerator.accumulate(unet):
            pixel_values = batch["pixel_values"].to(dtype=weight_dtype)
            model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                      device=model_input.device).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"])[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return loader, step, accelerator


def timed_steps(args, loader, step, device) -> dict:
    """Seconds per step over ``warmup + steps`` steps (epochs repeat); on CUDA one extra, untimed step first
    under torch's FLOP counter, for the model FLOP utilisation."""
    times, flops = [], None
    while len(times) < args.steps + args.warmup:
        start = time.perf_counter()  # like ours, a step's time includes fetching its batch
        for batch in loader:
            if flops is None and device.type == "cuda":
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
                with counter:
                    step(batch)
                flops = counter.get_total_flops()
            else:
                step(batch)  # loss.item() synchronises, as in ours
                times.append(time.perf_counter() - start)
            if len(times) >= args.steps + args.warmup:
                break
            start = time.perf_counter()
    return {"step_seconds": times, "flops_per_step": flops}


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data_dir = Path(args.data)
    if args.role == "reference":
        result = run_reference(args, data_dir)
    else:
        with tempfile.TemporaryDirectory() as out:
            result = run_ours(args, data_dir, Path(out) / "run", cache=args.role == "ours+cache",
                              quantize=args.quantize if args.role == "ours+quantized" else "none")
    times = result["step_seconds"][args.warmup:]
    result.update(steps_per_s=len(times) / sum(times), peak_rss_mb=peak_rss_mb())
    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["device"] = torch.cuda.get_device_name()
    result.pop("step_seconds")
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd",
                   help="built-in architecture: tiny-sd, tiny-flux (CPU) or sd15-arch, flux-arch (GPU)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 60 SD, 30 FLUX)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true", help="both sides (e.g. flux-arch on an 80 GB GPU)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant; the best steps/s is kept")
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "int8", "torchao_int8"],
                   help="FLUX: also run ours on a quantized frozen transformer (QLoRA), role ours+quantized")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per run (0: torch's default); 1 steadies CPU timings on a busy machine")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quantize != "none" and model_family(args.model) != "flux":
        sys.exit("--quantize: the benchmark trains a full fine-tune on SD models; a quantized base needs LoRA (FLUX)")
    if model_family(args.model) not in ("sd", "flux"):
        sys.exit(f"--model {args.model}: the benchmark has reference loops for SD and FLUX models only")
    if args.steps is None:
        args.steps = 30 if model_family(args.model) == "flux" else 60
    if args.role:
        return child(args)

    from t2i_personal.data.examples import write_examples

    with tempfile.TemporaryDirectory() as tmp:
        write_examples(Path(tmp) / "data", count=5, size=max(128, args.resolution))
        results: dict[str, dict] = {}
        spread: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            quantized = ("ours+quantized",) if args.quantize != "none" else ()
            for role in ("reference", "ours", "ours+cache", *quantized):
                cmd = [sys.executable, __file__, "--role", role, "--data", str(Path(tmp) / "data"),
                       "--model", args.model, "--resolution", str(args.resolution), "--batch", str(args.batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--mixed-precision", args.mixed_precision,
                       "--threads", str(args.threads), "--quantize", args.quantize,
                       *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
                env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                if out.returncode or not line:
                    sys.exit(f"{role} failed:\n{out.stderr[-4000:]}")
                r = json.loads(line[0][len("RESULT "):])
                spread.setdefault(role, []).append(r["steps_per_s"])
                if role not in results or r["steps_per_s"] > results[role]["steps_per_s"]:
                    results[role] = r
    ref = results["reference"]
    flux = model_family(args.model) == "flux"
    print(f"model builtin:{args.model}, {args.resolution} px, batch {args.batch}, mixed precision {args.mixed_precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats}"
          + (f", {args.threads} torch thread(s)" if args.threads else "")
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    if flux:
        from _flux_plain_loop import RANK

        print(f"reference: train_dreambooth_lora_flux.py's step (LoRA rank {RANK}, prompts encoded per step); "
              f"ours: dreambooth + LoRA rank {RANK}, family default targets, text encoded per step")
    print(f"{'run':<22}{'steps/s':>9}{'speed vs ref':>14}{'peak RSS MB':>13}{'RSS vs ref':>12}")
    for role, r in results.items():
        print(f"{role:<22}{r['steps_per_s']:>9.2f}{r['steps_per_s'] / ref['steps_per_s']:>13.2f}x"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] / ref['peak_rss_mb']:>11.2f}x")
    if "peak_gpu_gb" in ref:
        name = ref["device"]
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        for role, r in results.items():
            mfu = "" if not (peak and ref.get("flops_per_step")) else \
                f", MFU {ref['flops_per_step'] * r['steps_per_s'] / peak:.1%} (dense bf16 peak {peak / 1e12:.0f} TFLOP/s)"
            print(f"{role}: {r['steps_per_s']:.2f} it/s on {name}, peak GPU memory {r['peak_gpu_gb']:.1f} GiB{mfu}")
    print("steps/s of each repeat: " + "; ".join(f"{role} " + ", ".join(f"{v:.2f}" for v in values)
                                                 for role, values in spread.items()))
    cached = results['ours+cache']['steps_per_s'] / ref['steps_per_s']
    print(f"targets: ours >= 1.0x reference speed ({results['ours']['steps_per_s'] / ref['steps_per_s']:.2f}x), "
          f"<= 1.1x its peak memory ({results['ours']['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x); "
          + (f"with caching {cached:.2f}x (no target for FLUX)" if flux else f"with caching >= 1.3x ({cached:.2f}x)"))


if __name__ == "__main__":
    main()
