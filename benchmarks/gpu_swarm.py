"""Decode speed of an 8B Llama on GPUs: plain transformers in one process (the limit) against a Corolla swarm
(2 servers on one GPU, 2 servers on 2 GPUs, client on a GPU) and against `accelerate` offloading (the model
does not fit the GPU memory it is given; the rest lives in CPU memory and is copied in for every forward).

Model: the Llama-3-8B shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, FFN 14336, vocab 128256), random
weights, bfloat16. The checkpoint is written once as sharded safetensors under --workdir (16 GB: a local disk,
not $OUT). Method as benchmarks/swarm_latency.py: batch 1, greedy, a --prompt-token prompt, --new-tokens new
tokens timestamped by a streamer; ms/token = mean gap between tokens 2..N (the prompt's prefill is reported
apart as "first token"); median of --runs runs after a warm-up. tokens/s = 1000 / (ms/token).

    python3 benchmarks/gpu_swarm.py                                  # every setup, needs 2 GPUs for (c)
    python3 benchmarks/gpu_swarm.py --preset tiny --device cpu       # a quick check of the script on CPU

Needs corolla's own dependencies (hivemind, ...) where it runs; the servers are `python -m corolla.cli` processes,
so corolla must be importable by them too (installed, or run from the checkout's root). --deadline-s skips the
setups not yet started once that much time has passed (runs under a time limit).

Setups: local (a), swarm1 (b), swarm1-eager (b': the servers' decode steps without CUDA graphs), swarm2 (c),
offload (d); --setups picks some. Servers turn cuDNN attention off
(it builds a plan for every new key length, see docs/benchmarks.md); the one-process baseline runs with it off
too, and once with PyTorch's defaults ("local-default") for reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's corolla, not an installed one
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.launch import LocalSwarm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm_latency import TimingStreamer  # noqa: E402

PRESETS = {
    # Meta-Llama-3-8B's shape.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5),
    # For checking the script on a CPU in seconds.
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                 rms_norm_eps=1e-5),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sync_all() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        sync_all()
        torch.cuda.empty_cache()


def write_checkpoint(path: Path, preset: str, dtype: torch.dtype, device: str, shard_gib: float = 2.0) -> Path:
    """Random weights straight into sharded safetensors (no model is built): normal(0, 0.02) for every matrix and
    the embeddings, ones for the norms. Generated on `device` (fast), written shard by shard."""
    from safetensors.torch import save_file

    done = path / "WRITTEN"
    if done.is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**PRESETS[preset], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    config.dtype = dtype
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    element = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * element
        if current and size + nbytes > shard_gib * 2**30:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    generator = torch.Generator(device).manual_seed(0)
    weight_map, total = {}, 0
    began = time.perf_counter()
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shapes[name], dtype=dtype)
            else:
                tensor = torch.empty(shapes[name], dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
            tensors[name] = tensor.cpu().contiguous()
            weight_map[name] = file
            total += tensors[name].numel() * element
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    done.write_text(f"{total} bytes in {time.perf_counter() - began:.1f} s\n")
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards written to {path} "
          f"in {time.perf_counter() - began:.1f} s", flush=True)
    return path


def time_generation(model, input_ids, new_tokens: int, runs: int, warmup_tokens: int = 16, **generate_kwargs):
    """(ms/token median, first-token seconds median, tokens of the first timed run, every run's ms/token)."""

    def once(n):
        streamer = TimingStreamer()
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                                 **generate_kwargs)
        gaps = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
        return 1000 * statistics.mean(gaps), streamer.times[0] - began, out[0, input_ids.shape[1]:].tolist()

    if warmup_tokens:
        once(warmup_tokens)  # routes, connections, allocator, kernels' first launches
    results = [once(new_tokens) for _ in range(runs)]
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[0][2],
            [r[0] for r in results])


def agreement(tokens: list[int], reference: list[int] | None) -> float | None:
    if reference is None:
        return None
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])) / max(n, 1)


def run_local(model_dir: Path, device: str, dtype, input_ids, args, default_cudnn_sdp: bool | None,
              **generate_kwargs) -> dict:
    """One process, the whole model on `device`: cuDNN attention off (as on the servers), median of --runs; then,
    where `default_cudnn_sdp` is given, one more run with PyTorch's default attention backends. `generate_kwargs`,
    e.g. cache_implementation="static" (transformers then compiles the decode step)."""
    began = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device).eval()
    load_s = time.perf_counter() - began
    ids = input_ids.to(device)
    try:
        ms, first, tokens, all_ms = time_generation(model, ids, args.new_tokens, args.runs, **generate_kwargs)
        result = dict(ms_per_token=ms, first_token_s=first, tokens=tokens, runs_ms=all_ms, load_s=load_s)
        default = None
        if default_cudnn_sdp is not None:
            torch.backends.cuda.enable_cudnn_sdp(default_cudnn_sdp)
            try:
                ms, first, tokens, all_ms = time_generation(model, ids, args.new_tokens, 1)
            finally:
                torch.backends.cuda.enable_cudnn_sdp(False)
            default = dict(ms_per_token=ms, first_token_s=first, tokens=tokens, runs_ms=all_ms,
                           cudnn_sdp=default_cudnn_sdp)
    finally:
        del model
        free_memory()
    return result, default


def run_swarm(model_dir: Path, workdir: Path, server_devices: list[str], client_device: str, dtype, input_ids,
              args, name: str, server_args: list[str] = ()) -> dict:
    layers = PRESETS[args.preset]["num_hidden_layers"]
    bounds = [round(i * layers / len(server_devices)) for i in range(len(server_devices) + 1)]
    spans = list(zip(bounds[:-1], bounds[1:]))
    dtype_name = str(dtype).removeprefix("torch.")
    with LocalSwarm(workdir / name) as swarm:
        began = time.perf_counter()
        swarm.start_dht()
        servers = [swarm.start_server(model_dir, span, f"server{i}-{dev.replace(':', '')}",
                                      ["--device", dev, "--dtype", dtype_name, "--throughput-cache",
                                       str(workdir / name / f"throughput{i}.json")]
                                      + (["--num-threads", str(args.server_threads)] if args.server_threads else [])
                                      + list(server_args),
                                      wait=False)
                   for i, (span, dev) in enumerate(zip(spans, server_devices))]
        for process in servers:
            swarm.wait_for_line(process, "ready:", args.server_timeout)
        start_s = time.perf_counter() - began
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                               dtype=dtype)
        model = model.to(client_device)
        try:
            ms, first, tokens, all_ms = time_generation(model, input_ids.to(client_device), args.new_tokens, args.runs)
        finally:
            model.close()
            del model
            free_memory()
    return dict(ms_per_token=ms, first_token_s=first, tokens=tokens, runs_ms=all_ms, start_s=start_s,
                spans=spans, server_devices=server_devices, client_device=client_device)


def run_offload(model_dir: Path, workdir: Path, device: str, dtype, input_ids, args) -> dict:
    """from_pretrained(device_map="auto") with the GPU capped at --offload-gpu-gib: accelerate places what fits on
    the GPU and keeps the rest in CPU memory, copying each offloaded layer in for every forward."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        max_memory = {index: f"{args.offload_gpu_gib}GiB", "cpu": f"{args.offload_cpu_gib}GiB"}
        extra = {}
    else:  # CPU check of the code path: what does not fit the cap goes to disk instead
        max_memory = {"cpu": f"{args.offload_gpu_gib}GiB"}
        extra = {"offload_folder": str(workdir / "offload")}
    began = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="auto", max_memory=max_memory,
                                             **extra).eval()
    load_s = time.perf_counter() - began
    placement: dict[str, int] = {}
    for module, where in (getattr(model, "hf_device_map", None) or {}).items():
        placement[str(where)] = placement.get(str(where), 0) + 1
    first_device = next(iter(model.hf_device_map.values())) if getattr(model, "hf_device_map", None) else device
    ids_device = f"cuda:{first_device}" if isinstance(first_device, int) else (
        first_device if first_device not in ("cpu", "disk") else device)
    try:
        ms, first, tokens, all_ms = time_generation(model, input_ids.to(ids_device), args.offload_tokens, 1,
                                                    warmup_tokens=0)
    finally:
        del model
        free_memory()
    return dict(ms_per_token=ms, first_token_s=first, tokens=tokens, runs_ms=all_ms, load_s=load_s,
                placement=placement, max_memory={str(k): v for k, v in max_memory.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda:0", help="the one-process baseline's and the client's device")
    parser.add_argument("--gpus", nargs="+", default=None,
                        help="devices of the 2 servers in setup swarm2 (default: cuda:0 cuda:1)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 (cuda), float32 (cpu)")
    parser.add_argument("--workdir", default="/tmp/corolla-gpu-swarm", help="checkpoint and logs (local disk)")
    setups = ["local", "local-static", "local-default", "swarm1", "swarm1-eager", "swarm2", "offload"]
    parser.add_argument("--setups", nargs="+", default=setups, choices=setups)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--offload-tokens", type=int, default=4, help="new tokens for the (slow) offloading setup")
    parser.add_argument("--offload-gpu-gib", type=float, default=8.0)
    parser.add_argument("--offload-cpu-gib", type=float, default=200.0)
    parser.add_argument("--server-timeout", type=float, default=180.0)
    parser.add_argument("--server-threads", type=int, default=None, help="servers' torch CPU threads (--num-threads)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="skip setups not yet started once this many seconds have passed")
    parser.add_argument("--json", default=None, help="default: $OUT/gpu_swarm.json where $OUT is set")
    args = parser.parse_args()
    began = time.perf_counter()
    on_cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bfloat16" if on_cuda else "float32")]
    gpus = args.gpus or (["cuda:0", "cuda:1"] if on_cuda else ["cpu", "cpu"])
    default_cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    if on_cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)
    workdir = Path(args.workdir)
    json_path = args.json or (os.path.join(os.environ["OUT"], "gpu_swarm.json") if os.environ.get("OUT") else None)

    device_name = torch.cuda.get_device_name(0) if on_cuda else "cpu"
    import transformers
    report = {"device": device_name, "gpus": torch.cuda.device_count() if on_cuda else 0,
              "torch": torch.__version__, "transformers": transformers.__version__, "preset": args.preset,
              "config": PRESETS[args.preset], "dtype": str(dtype), "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "runs": args.runs, "results": {}}
    print(f"{device_name} x{report['gpus']}, torch {torch.__version__}, transformers {transformers.__version__}",
          flush=True)

    model_dir = write_checkpoint(workdir / f"llama-{args.preset}-random", args.preset, dtype,
                                 args.device if on_cuda else "cpu")
    total_bytes = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    params = total_bytes // torch.empty((), dtype=dtype).element_size()
    report["params"] = params
    vocab = PRESETS[args.preset]["vocab_size"]
    input_ids = torch.cat([torch.tensor([[1]]), torch.randint(3, vocab, (1, args.prompt_tokens - 1),
                                                              generator=torch.Generator().manual_seed(1))], dim=1)

    def save():
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=1))

    reference = None

    def finish(setup, result, wall_s):
        result["tokens_per_s"] = 1000 / result["ms_per_token"]
        result["tokens_equal_local"] = agreement(result["tokens"], reference)
        result["wall_s"] = wall_s
        report["results"][setup] = result
        print(f"[{setup}] {result['ms_per_token']:.2f} ms/token ({result['tokens_per_s']:.1f} tokens/s), first token "
              f"{result['first_token_s'] * 1000:.0f} ms, runs {[round(x, 2) for x in result['runs_ms']]}, "
              f"{wall_s:.0f} s", flush=True)
        save()

    for setup in args.setups:
        if setup == "local-default" and "local" in args.setups:
            continue  # measured with "local", on the same loaded model
        elapsed = time.perf_counter() - began
        if args.deadline_s is not None and elapsed > args.deadline_s:
            print(f"[{setup}] skipped: {elapsed:.0f} s past the {args.deadline_s:.0f} s deadline", flush=True)
            report["results"][setup] = {"skipped": "deadline"}
            continue
        if setup == "swarm2" and on_cuda and torch.cuda.device_count() < 2:
            print(f"[{setup}] skipped: needs 2 GPUs", flush=True)
            report["results"][setup] = {"skipped": "one GPU"}
            continue
        print(f"[{setup}] running ({elapsed:.0f} s in)", flush=True)
        t0 = time.perf_counter()
        try:
            if setup == "local":
                result, default = run_local(model_dir, args.device, dtype, input_ids, args,
                                            default_cudnn_sdp if "local-default" in args.setups else None)
                reference = result["tokens"]
                if default is not None:
                    finish("local-default", default, 0.0)
            elif setup == "local-static":  # the strongest one-process figure: static cache, compiled decode step
                result = run_local(model_dir, args.device, dtype, input_ids, args, None,
                                   cache_implementation="static")[0]
            elif setup == "local-default":
                result = run_local(model_dir, args.device, dtype, input_ids, args, default_cudnn_sdp)[1]
            elif setup == "swarm1":
                result = run_swarm(model_dir, workdir, [args.device, args.device], args.device, dtype, input_ids,
                                   args, "swarm-1gpu")
            elif setup == "swarm1-eager":
                result = run_swarm(model_dir, workdir, [args.device, args.device], args.device, dtype, input_ids,
                                   args, "swarm-1gpu-eager", ["--no-cuda-graphs"])
            elif setup == "swarm2":
                result = run_swarm(model_dir, workdir, gpus, args.device, dtype, input_ids, args, "swarm-2gpu")
            else:
                result = run_offload(model_dir, workdir, args.device, dtype, input_ids, args)
        except Exception as e:  # keep the other setups' figures
            import traceback
            traceback.print_exc()
            report["results"][setup] = {"error": repr(e)}
            save()
            continue
        finish(setup, result, time.perf_counter() - t0)

    results = report["results"]
    local = results.get("local", {}).get("tokens_per_s")
    offload = results.get("offload", {}).get("tokens_per_s")
    names = {"local": "(a) transformers, 1 process, 1 GPU (cuDNN attention off)",
             "local-default": "(a') same, PyTorch's default attention backends",
             "swarm1": "(b) Corolla, 2 servers on 1 GPU, client on GPU",
             "swarm1-eager": "(b') the same, servers --no-cuda-graphs",
             "swarm2": "(c) Corolla, 2 servers on 2 GPUs, client on GPU",
             "offload": f"(d) accelerate offload, GPU capped {args.offload_gpu_gib:g} GiB"}
    print(f"\n{device_name} x{report['gpus']}; Llama {args.preset} shape ({params / 1e9:.2f} B params), {dtype}, "
          f"random weights; batch 1, greedy, prompt {args.prompt_tokens}, {args.new_tokens} new tokens "
          f"(offload: {args.offload_tokens}), median of {args.runs}")
    print(f"{'setup':<58} {'ms/token':>9} {'tokens/s':>9} {'first tok':>10} {'vs (a)':>7} {'vs (d)':>8} "
          f"{'same tokens':>11}")
    for setup in args.setups:
        r = results.get(setup, {})
        if "tokens_per_s" not in r:
            print(f"{names[setup]:<58} {r.get('skipped') or r.get('error', 'not run')}")
            continue
        vs_local = f"{r['tokens_per_s'] / local:.2f}x" if local else "-"
        vs_offload = f"{r['tokens_per_s'] / offload:.1f}x" if offload else "-"
        same = "-" if r["tokens_equal_local"] is None else f"{r['tokens_equal_local']:.2f}"
        print(f"{names[setup]:<58} {r['ms_per_token']:>9.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['first_token_s'] * 1000:>8.0f}ms {vs_local:>7} {vs_offload:>8} {same:>11}")
    for setup in ("swarm1", "swarm1-eager", "swarm2"):
        r = results.get(setup, {})
        if "tokens_per_s" in r and local and offload:
            print(f"{setup}: swarm/one-process {r['tokens_per_s'] / local:.2f} (target >= 0.8: "
                  f"{'met' if r['tokens_per_s'] / local >= 0.8 else 'NOT met'}), swarm/offloading "
                  f"{r['tokens_per_s'] / offload:.1f}x (target >= 10x: "
                  f"{'met' if r['tokens_per_s'] / offload >= 10 else 'NOT met'})")
    report["total_s"] = time.perf_counter() - began
    save()


if __name__ == "__main__":
    main()
