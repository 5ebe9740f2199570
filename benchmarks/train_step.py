"""One MT4SSL pretraining update: time, peak memory, audio seconds per second and achieved
FLOP/s in fp32 and bf16 autocast, side by side with fairseq's data2vec-audio (plus a k-means
cross-entropy head, so that it does MT4SSL's work) when fairseq-fixed is installed.

    python benchmarks/train_step.py [--device cpu|cuda] [--models base tiny]
        [--precisions fp32 bf16] [--batch 2] [--seconds 4] [--repeats 10] [--warmup 2]
        [--no-fairseq] [--profile] [--no-write]

An update = student forward and backward, EMA-teacher forward, AdamW step (fused where the
device has it, else foreach), EMA step. Every implementation sees the same fixed batch:
random audio, random cluster ids and one span mask (sampled once, fixed seed). Time: median
of --repeats timed updates after --warmup untimed ones, all in this process. FLOPs: one update
counted by torch.utils.flop_counter with layerdrop off (every layer counts), divided by the
median time and compared with the best time of a large torch.mm at the same precision on the
same device. Memory: peak of building the model and running --warmup + 2 updates, each row in
a fresh process (in one process the allocator keeps what an earlier row freed, so later rows
would look smaller): on CPU peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS
before the model was built; on CUDA torch.cuda.max_memory_allocated minus memory_allocated.
Writes its section of results/perf.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from mt4ssl.models.cnn import SAMPLE_RATE, num_frames  # noqa: E402
from mt4ssl.models.masking import sample_span_mask  # noqa: E402
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig, model_config  # noqa: E402

LABELS, NUM_CLASSES = "hubert500", 500  # the k-means target of the paper's runs
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# fairseq.utils.index_put writes the fp32 mask_emb into the bf16 features: "Index put requires
# the source and destination dtypes match"
FAIRSEQ_BF16 = "not run: fairseq's data2vec-audio crashes under bf16 autocast (index_put dtype mismatch)"

# ---------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back to the OS
        except (OSError, AttributeError):
            pass


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _proc_status_bytes("VmRSS")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status_bytes("VmHWM")


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` large square torch.mm at `dtype` on `device`."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                              out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels, not the CPU flash kernel
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}

# ---------------------------------------------------------------------------- what is trained


@dataclass
class Batch:
    wav: torch.Tensor  # (B, S) float
    labels: torch.Tensor  # (B, T) int64 cluster ids
    mask: torch.Tensor  # (B, T) bool, the same for every implementation


def make_batch(cfg: ModelConfig, batch: int, seconds: float, device: torch.device, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    samples = int(seconds * SAMPLE_RATE)
    frames = num_frames(samples, cfg.conv_layers)
    mask = sample_span_mask([frames] * batch, frames, cfg.mask_prob, cfg.mask_length,
                            np.random.default_rng(seed), cfg.mask_min_spans, cfg.require_same_masks)
    return Batch(
        wav=torch.randn(batch, samples, generator=g).to(device),
        labels=torch.randint(NUM_CLASSES, (batch, frames), generator=g).to(device),
        mask=torch.from_numpy(mask).to(device),
    )


@dataclass
class Trainee:
    """A model under test: `loss()` runs the forward pass on the fixed batch and returns the
    loss divided by the number of masked frames; `after_step(n)` is the EMA update."""

    module: nn.Module  # holds every trainable parameter
    loss: Callable[[], torch.Tensor]
    after_step: Callable[[int], None]
    set_layerdrop: Callable[[float], None]


def build_mt4ssl(cfg: ModelConfig, batch: Batch, device: torch.device) -> Trainee:
    model = MT4SSL(cfg).to(device)

    def loss() -> torch.Tensor:
        out = model(batch.wav, mask_indices=batch.mask, labels={LABELS: batch.labels})
        return out.loss / out.sample_size

    def set_layerdrop(p: float) -> None:
        model.encoder.layerdrop = p

    return Trainee(model, loss, model.update_targets, set_layerdrop)


def fairseq_missing() -> str | None:
    """Why fairseq's data2vec-audio cannot be built here, or None if it can."""
    try:  # fairseq-fixed ships the examples inside the package, as fairseq.examples
        import fairseq.examples.data2vec.models.data2vec_audio  # noqa: F401
    except Exception as e:  # not installed, or broken: the benchmark still runs without it
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def build_fairseq(cfg: ModelConfig, batch: Batch, device: torch.device) -> Trainee:
    """fairseq's data2vec-audio configured like our `cfg` (its base_librispeech.yaml for base),
    plus Linear(D, 500) cross-entropy on the masked frames of the last layer (the input of
    its `final_proj`), so it computes what MT4SSL's two targets compute."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel

    t = cfg.teacher
    fcfg = Data2VecAudioConfig(
        extractor_mode=cfg.extractor_mode,
        conv_feature_layers=str(list(cfg.conv_layers)),
        conv_bias=cfg.conv_bias,
        encoder_layers=cfg.num_layers,
        encoder_embed_dim=cfg.embed_dim,
        encoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_attention_heads=cfg.num_heads,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        encoder_layerdrop=cfg.layerdrop,
        dropout_input=cfg.dropout_input,
        dropout_features=0.0,
        feature_grad_mult=1.0,
        conv_pos=cfg.pos_conv_kernel * cfg.pos_conv_depth,  # fairseq: kernel = conv_pos // depth
        pos_conv_depth=cfg.pos_conv_depth,
        conv_pos_groups=cfg.pos_conv_groups,
        mask_prob=cfg.mask_prob,
        mask_length=cfg.mask_length,
        require_same_masks=cfg.require_same_masks,
        mask_dropout=0.0,
        average_top_k_layers=t.top_k,
        instance_norm_target_layer=True,
        loss_beta=0,
        loss_scale=t.loss_scale,
        ema_decay=t.ema_decay,
        ema_end_decay=t.ema_end_decay,
        ema_anneal_end_step=t.ema_anneal_updates,
        max_update=400_000,
        ema_transformer_only=True,
        ema_layers_only=True,
    )
    model = Data2VecAudioModel(fcfg).to(device)
    model.set_num_updates(0)  # fairseq makes the EMA teacher at the first call
    head = nn.Linear(cfg.embed_dim, NUM_CLASSES).to(device)
    masked = {}
    model.final_proj.register_forward_pre_hook(lambda _module, args: masked.update(x=args[0]))

    def loss() -> torch.Tensor:
        # fairseq normalizes the waveform in its dataset; ours does it in the model
        out = model(F.layer_norm(batch.wav, batch.wav.shape[-1:]), mask_indices=batch.mask)
        logits = head(masked.pop("x")).float()
        ce = F.cross_entropy(logits, batch.labels[batch.mask], reduction="sum")
        return (out["losses"]["regression"] + ce) / out["sample_size"]

    def set_layerdrop(p: float) -> None:
        model.encoder.layerdrop = p

    return Trainee(nn.ModuleDict({"model": model, "head": head}), loss, model.set_num_updates, set_layerdrop)


BUILDERS = {"mt4ssl": build_mt4ssl, "fairseq": build_fairseq}


def make_optimizer(module: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    params = [p for p in module.parameters() if p.requires_grad]  # not the EMA teacher
    kwargs = dict(lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs), "foreach"


def update(trainee: Trainee, opt: torch.optim.Optimizer, device: torch.device,
           dtype: torch.dtype | None, num_updates: int) -> None:
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with record_function("forward (student + teacher)"), autocast:
        loss = trainee.loss()
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer step"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    with record_function("EMA step"):
        trainee.after_step(num_updates)


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, which fails on fairseq's teacher
    (a view taken under no_grad of a tensor that requires grad); we only need the total."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def count_flops(trainee: Trainee, device: torch.device, dtype: torch.dtype | None) -> int:
    """FLOPs of one forward + backward with every layer run (the optimizer and EMA steps
    are elementwise and not counted)."""
    trainee.set_layerdrop(0.0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        with autocast:
            loss = trainee.loss()
        loss.backward()
    trainee.module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@dataclass
class Result:
    model: str
    impl: str
    precision: str
    times: list[float] = field(default_factory=list)
    flops: int = 0
    memory: int = 0
    params: int = 0
    optimizer: str = ""


def measure(impl: str, model: str, precision: str, args, device: torch.device) -> Result:
    """Time --repeats updates after --warmup, count the FLOPs of one; memory in a fresh process."""
    release_memory(device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # fairseq's layerdrop draws from numpy
    cfg = model_config(model)
    trainee = BUILDERS[impl](cfg, make_batch(cfg, args.batch, args.seconds, device, args.seed), device)
    opt, kind = make_optimizer(trainee.module)
    res = Result(model, impl, precision, optimizer=kind,
                 params=sum(p.numel() for p in trainee.module.parameters() if p.requires_grad))
    dtype = DTYPES[precision]
    n = 0
    for _ in range(args.warmup):
        n += 1
        update(trainee, opt, device, dtype, n)
    sync(device)
    for _ in range(args.repeats):
        n += 1
        t0 = time.perf_counter()
        update(trainee, opt, device, dtype, n)
        sync(device)
        res.times.append(time.perf_counter() - t0)
    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            update(trainee, opt, device, dtype, n + 1)
            sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n--- profile: {model} {impl} {precision}, one update")
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
    res.flops = count_flops(trainee, device, dtype)
    del trainee, opt
    release_memory(device)
    res.memory = memory_in_fresh_process(impl, model, precision, args)
    median = statistics.median(res.times)
    print(f"{model:5s} {impl:10s} {precision}: {median:.3f} s/update (min {min(res.times):.3f}, "
          f"max {max(res.times):.3f}), {res.flops / 1e9:.1f} GFLOP, peak memory +{res.memory / 2**30:.2f} GiB",
          flush=True)
    return res


def memory_in_fresh_process(impl: str, model: str, precision: str, args) -> int:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_memory, (impl, model, precision, vars(args)))


def _peak_memory(impl: str, model: str, precision: str, args: dict) -> int:
    """Run in a fresh process: peak memory of building the model and --warmup + 2 updates."""
    device = torch.device(args["device"])
    torch.manual_seed(args["seed"])
    np.random.seed(args["seed"])
    cfg = model_config(model)
    batch = make_batch(cfg, args["batch"], args["seconds"], device, args["seed"])
    release_memory(device)
    baseline = memory_now(device)
    reset_peak_memory(device)
    trainee = BUILDERS[impl](cfg, batch, device)
    opt, _ = make_optimizer(trainee.module)
    for n in range(1, args["warmup"] + 3):
        update(trainee, opt, device, DTYPES[precision], n)
    sync(device)
    return peak_memory(device) - baseline


# ---------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["base", "tiny"], choices=["base", "tiny", "large"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=2, help="utterances per batch")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    p.add_argument("--repeats", type=int, default=10, help="timed updates per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fairseq", action="store_true", help="skip fairseq even if installed")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per run")
    p.add_argument("--no-write", action="store_true", help="do not write results/perf.md")
    args = p.parse_args()
    device = torch.device(args.device)

    why_not = "skipped (--no-fairseq)" if args.no_fairseq else fairseq_missing()
    if why_not:
        print(f"fairseq data2vec-audio: {why_not}; its column is skipped "
              "(pip install -e '.[fairseq]' to compare)", flush=True)
    peaks = {name: matmul_peak(device, dtype or torch.float32) for name, dtype in DTYPES.items()
             if name in args.precisions or (name == "fp32" and not why_not)}
    print("torch.mm peak: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()), flush=True)

    results: list[Result] = []
    for name in args.models:
        for precision in args.precisions:
            results.append(measure("mt4ssl", name, precision, args, device))
        if not why_not:
            results.append(measure("fairseq", name, "fp32", args, device))

    body = report(results, peaks, args, device, why_not)
    print("\n" + body)
    if not args.no_write:
        command = " ".join(["python", "benchmarks/train_step.py", *sys.argv[1:]])
        command = command if sys.argv[1:] else f"make bench  # {command}"
        write_section("pretraining update: MT4SSL vs fairseq data2vec-audio", command, body)


def report(results: list[Result], peaks: dict[str, float], args, device: torch.device, why_not) -> str:
    audio = args.batch * args.seconds
    rows = []
    for r in results:
        median = statistics.median(r.times)
        ref = next((f for f in results if f.model == r.model and f.impl == "fairseq"), None)
        vs_time = f"{median / statistics.median(ref.times):.2f}" if ref else "n/a"
        vs_mem = f"{r.memory / ref.memory:.2f}" if ref else "n/a"
        impl = "MT4SSL (ours)" if r.impl == "mt4ssl" else "fairseq data2vec-audio + CE head"
        rows.append(
            f"| {r.model} | {impl} | {r.precision} | {median:.3f} ({min(r.times):.3f}-{max(r.times):.3f}) "
            f"| {audio / median:.1f} | {r.flops / 1e9:.0f} | {r.flops / median / 1e12:.3f} "
            f"| {100 * r.flops / median / peaks[r.precision]:.0f}% | {r.memory / 2**30:.2f} "
            f"| {vs_time} | {vs_mem} |"
        )
        if r.impl == "fairseq" and "bf16" in args.precisions:
            rows.append(f"| {r.model} | {impl} | bf16 | {FAIRSEQ_BF16} |  |  |  |  |  |  |  |")
    params = {(r.model, r.impl): r.params for r in results}
    param_text = "; ".join(
        f"{m}: ours {params[(m, 'mt4ssl')] / 1e6:.1f} M" + (
            f", fairseq {params[(m, 'fairseq')] / 1e6:.1f} M" if (m, "fairseq") in params else "")
        for m in args.models
    )
    memory_what = ("torch.cuda.max_memory_allocated minus memory_allocated before the model was built"
                   if device.type == "cuda" else "peak RSS (VmHWM) minus the RSS before the model was built")
    fairseq_line = ("fairseq: `fairseq-fixed` data2vec-audio (`Data2VecAudioModel`, its base_librispeech settings "
                    "scaled to the preset) + Linear(D, 500) cross-entropy on the masked frames, fp32 only."
                    if not why_not else f"fairseq: not measured ({why_not}).")
    optimizers = "/".join(sorted({r.optimizer for r in results}))
    return f"""One pretraining update (student forward + backward, EMA-teacher forward, {optimizers} AdamW step, EMA step)
on a fixed batch of {args.batch} x {args.seconds:g} s of random audio (16 kHz) with random cluster ids
(500 classes) and one fixed span mask shared by all runs; {args.warmup} untimed then {args.repeats} timed
updates per row; device `{device}`, {torch.get_num_threads()} threads, torch {torch.__version__}.
Trainable parameters: {param_text}. {fairseq_line}

| model | implementation | precision | time/update, s: median (min-max) | audio s/s | GFLOP/update | TFLOP/s | % of mm peak | peak memory (GiB) | time / fairseq fp32 | memory / fairseq fp32 |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- torch.mm peak on this device (best of 10, square {"8192" if device.type == "cuda" else "2048"}): {", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items())};
  "% of mm peak" compares each row with the peak of its own precision.
- GFLOP/update: torch.utils.flop_counter over one forward + backward with layerdrop off (all layers
  run; the timed updates use layerdrop {model_config(args.models[0]).layerdrop}, so achieved FLOP/s is
  slightly overstated); matmuls, convolutions and attention only.
- Peak memory: building the model (parameters, EMA teacher) and running {args.warmup + 2} updates (gradients,
  AdamW state, activations), each row in a fresh process; {memory_what}.
- Targets: ours fp32 no slower than fairseq fp32 (ratio <= 1), ours bf16 at least 2x faster
  (ratio <= 0.5), and no more memory (ratio <= 1).
"""


if __name__ == "__main__":
    main()
