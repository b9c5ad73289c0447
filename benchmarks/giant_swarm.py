"""180B-class models through a swarm on one GPU: the Falcon-180B and BLOOM-176B shapes in nf4, 3-4 server processes
and the client on the same GPU, against Petals' published figures and the offloading bound measured here.

No 360 GB checkpoint fits the GPU machine's 64 GiB disk: servers build their blocks from the config with random
weights, on the GPU, one block at a time, quantized as made (`corolla server --synthetic-weights-seed`, a
benchmarking facility: such servers announce the model as NAME+synthetic<seed>, so no normal client uses them;
corolla/models/synthetic.py). The client's embeddings and LM head are random too, written once as a small
checkpoint. Speed depends on shapes, not values.

Measured, each table from this one run (ratios inside the run):
- single-batch decode ms/token (batch 1, greedy, a 16-token prompt, --new-tokens tokens; mean gap between tokens
  2..N, median of --runs) at each --delays one-way delay per message (servers' --debug-delay-ms, the benchmarks'
  existing emulation); plain, and with drafting (prompt lookup, `prompt_lookup_num_tokens`) on a repetitive prompt;
- parallel forward tokens/s through all blocks at batch 1 x 128 and 64 x 128 tokens (Petals paper's column);
- one LoRA training step (batch 8 x 256, r=8 on the attention's fused QKV) through the swarm, forward + backward;
- the offloading bound: pinned host-to-device bandwidth measured here x the model's bytes in int8 and nf4 (the time
  any RAM-offloading system needs per token at least);
- each server's peak GPU memory (nvidia-smi) and the cache room it announces;
- agreement: blocks [0, --check-blocks) rebuilt in this process from the same seed and quantized the same way,
  against the swarm's output for those blocks (the full model cannot run in one process next to the servers).

    python3 benchmarks/giant_swarm.py --preset falcon-180b --servers 4 --out /tmp/out/falcon.json
    python3 benchmarks/giant_swarm.py --preset bloom-176b --servers 4 --delays 0 25
    .venv/bin/python benchmarks/giant_swarm.py --preset falcon-tiny --device cpu --quant none   # a check on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's corolla
from transformers import BloomConfig, FalconConfig  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.launch import LocalSwarm, split_blocks  # noqa: E402
from corolla.models.checkpoint import make_span_helpers, meta_model  # noqa: E402
from corolla.models.lora import LoraSettings  # noqa: E402
from corolla.models.spec import SpanInputs, family_for  # noqa: E402
from corolla.models.synthetic import synthetic_blocks, synthetic_name, write_synthetic_checkpoint  # noqa: E402
from corolla.server.quantize import block_bytes, quantize_blocks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_swarm import time_generation  # noqa: E402

PRESETS = {
    # tiiuae/falcon-180B's shape.
    "falcon-180b": (FalconConfig, dict(hidden_size=14848, num_hidden_layers=80, num_attention_heads=232, num_kv_heads=8,
                                       new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
                                       ffn_hidden_size=59392, vocab_size=65024, max_position_embeddings=2048,
                                       rope_theta=10000.0, bos_token_id=11, eos_token_id=11)),
    # bigscience/bloom's shape (176B).
    "bloom-176b": (BloomConfig, dict(hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=3)),
    # For checking the script in seconds.
    "falcon-tiny": (FalconConfig, dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_kv_heads=2,
                                       new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
                                       vocab_size=1000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)),
    "bloom-tiny": (BloomConfig, dict(hidden_size=256, n_layer=8, n_head=8, vocab_size=1000, bos_token_id=1,
                                     eos_token_id=2, pad_token_id=3)),
}
PETALS = {  # published figures, for the table's reference column
    "decode_tokens_s_readme_falcon180b": 4.0,
    "decode_steps_s_paper_176b": 0.83,
    "forward_tokens_s_paper_batch1": 32.6,
    "forward_tokens_s_paper_batch64": 179.4,
    "offloading_s_per_token_paper": 5.5,
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def block_parameter_count(config) -> tuple[int, int]:
    """(parameters of all blocks, of which in linear weights)."""
    spec = family_for(config)
    block = meta_model(spec, config, torch.bfloat16).get_submodule(spec.block_path(0))
    total = sum(p.numel() for p in block.parameters())
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    return total * config.num_hidden_layers, linear * config.num_hidden_layers


def offloading_bound(config, device: str) -> dict:
    """Pinned host-to-device bandwidth x the blocks' bytes: the least time per token of any system that streams the
    weights from host memory for every token (int8: 1 byte per weight; nf4: 0.5 byte + one fp32 absmax per 64)."""
    total, linear = block_parameter_count(config)
    other = total - linear  # norms and biases stay 16-bit
    sizes = {"int8": linear * 1 + other * 2, "nf4": linear * (0.5 + 4 / 64) + other * 2}
    result = {"block_parameters": total, "bytes": sizes}
    if not device.startswith("cuda"):
        return result
    host = torch.empty(2 << 30, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(host, device=device)
    target.copy_(host, non_blocking=True)
    sync(device)
    times = []
    for _ in range(5):
        began = time.perf_counter()
        target.copy_(host, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - began)
    bandwidth = host.numel() / min(times)
    del host, target
    result.update(h2d_gb_s=bandwidth / 1e9, bound_s_per_token={k: v / bandwidth for k, v in sizes.items()})
    return result


def measure_accelerate_offloading(config, args) -> dict:
    """accelerate's RAM offloading (what `from_pretrained(device_map="auto")` does when the GPU is too small) on the
    first --offload-layers blocks in bf16: the blocks live in CPU memory and are copied to the GPU for every forward.
    The whole model (360 GB in bf16) does not fit the machine's memory, so the figure per layer is extrapolated to
    all layers, and said so."""
    from accelerate import dispatch_model

    layers = args.offload_layers
    fields = {("n_layer" if isinstance(config, BloomConfig) else "num_hidden_layers"): layers}
    small = type(config)(**{**config.to_dict(), **fields})
    spec = family_for(small)
    model = meta_model(spec, small, torch.bfloat16)
    device = torch.device(args.device)
    blocks = synthetic_blocks(small, 0, layers, device, torch.bfloat16, args.seed, prepare=lambda block: block.cpu())
    for index, block in enumerate(blocks):
        parent, _, child = spec.block_path(index).rpartition(".")
        model.get_submodule(parent)._modules[child] = block
    generator = torch.Generator(device=device).manual_seed(1)
    for path in spec.client_paths:
        module = model.get_submodule(path)
        module.to_empty(device=device)
        for name, parameter in module.named_parameters():
            with torch.no_grad():
                parameter.normal_(0, 0.02, generator=generator) if parameter.ndim > 1 else parameter.fill_(1.0)
    model.tie_weights()
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # rotary tables: computed by transformers' own init
            module = model.get_submodule(name.rpartition(".")[0])
            module.to_empty(device=device)
            model._init_weights(module)
    main = (device.index or 0) if device.type == "cuda" else "cpu"  # on CPU: only a check of this code path
    device_map = {path: main for path in spec.client_paths}
    device_map.update({spec.block_path(i): "cpu" for i in range(layers)})
    model = dispatch_model(model, device_map=device_map, main_device=device)
    ids = torch.randint(5, small.vocab_size, (1, 16), device=device)
    ms, first_s, _, runs = time_generation(model, ids, args.offload_tokens, 1, warmup_tokens=2)
    del model, blocks
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(layers=layers, ms_per_token=ms, ms_per_layer=ms / layers,
                extrapolated_s_per_token=ms / layers * config.num_hidden_layers / 1000, runs_ms=runs)


def gpu_memory_by_pid() -> dict[int, float]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    memory = {}
    for line in out.strip().splitlines():
        pid, used = (part.strip() for part in line.split(","))
        memory[int(pid)] = float(used) / 1024
    return memory


def time_forward(model, batch: int, tokens: int, device: str, runs: int) -> float:
    """Tokens/s of a stateless forward of batch x tokens hidden states through all remote blocks."""
    hidden = torch.randn(batch, tokens, model.config.hidden_size, dtype=model.dtype, device=device) * 0.02
    with torch.inference_mode():
        model.remote.forward(hidden)  # warm-up
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            model.remote.forward(hidden)
            times.append(time.perf_counter() - began)
    return batch * tokens / statistics.median(times)


def time_training_step(model, batch: int, tokens: int, device: str, runs: int) -> float:
    ids = torch.randint(5, model.config.vocab_size, (batch, tokens), device=device)
    optimizer = torch.optim.Adam([p for p in model.tuning.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        sync(device)

    step()
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def check_agreement(model, config, args, quant: str) -> dict:
    """Blocks [0, k) built here from the same seed, quantized the same way, against the swarm's output for them."""
    k = args.check_blocks
    spec = family_for(config)
    device = torch.device(args.device)
    blocks = synthetic_blocks(config, 0, k, device, model.dtype, args.seed,
                              prepare=lambda block: quantize_blocks([block], quant, device, model.dtype)[0])
    helpers = make_span_helpers(spec, config, device, model.dtype)
    hidden = torch.randn(1, 16, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(device, model.dtype)
    positions = torch.arange(16, device=device).unsqueeze(0)
    with torch.inference_mode():
        want = spec.run_span(config, helpers, blocks, 0, SpanInputs(hidden, positions, None, None)).float()
        got = model.swarm.call(model.remote.forward_span(0, k, hidden, positions, None), 600)[0].to(device).float()
    del blocks
    scale = want.abs().max().item()
    error = (got - want).abs().max().item()
    return dict(blocks=k, max_abs_error=error, output_scale=scale, relative=error / max(scale, 1e-12))


def run_swarm(config_dir: Path, config, workdir: Path, delay_ms: float, args, first: bool) -> dict:
    spans = split_blocks(config.num_hidden_layers, args.servers)
    server_args = ["--device", args.device, "--dtype", args.dtype, "--quant", args.quant,
                   "--synthetic-weights-seed", str(args.seed), "--cache-tokens", str(args.cache_tokens),
                   "--max-session-length", "2048", "--throughput-cache", str(workdir / "throughput.json"),
                   "--debug-delay-ms", str(delay_ms)] + (["--no-cuda-graphs"] if args.no_graphs else [])
    dtype = getattr(torch, args.dtype)
    result: dict = {"delay_ms": delay_ms, "spans": spans}
    with LocalSwarm(workdir / f"swarm-{delay_ms:g}ms") as swarm:
        began = time.perf_counter()
        swarm.start_dht()
        servers = swarm.start_servers(config_dir, spans, server_args, timeout=args.server_timeout)
        result["start_s"] = time.perf_counter() - began
        name = synthetic_name(config_dir.name, args.seed)
        model = AutoDistributedModelForCausalLM.from_pretrained(config_dir, initial_peers=swarm.initial_peers,
                                                                dtype=dtype, model_name=name).to(args.device)
        try:
            generator = torch.Generator().manual_seed(0)
            prompt = torch.randint(5, config.vocab_size, (1, 16), generator=generator).to(args.device)
            ms, first_s, tokens, runs = time_generation(model, prompt, args.new_tokens, args.runs)
            result["decode"] = dict(ms_per_token=ms, tokens_s=1000 / ms, first_token_s=first_s, runs_ms=runs)
            print(f"[{delay_ms:g} ms] decode {ms:.1f} ms/token", flush=True)
            motif = torch.randint(5, config.vocab_size, (1, 8), generator=generator)
            repetitive = motif.repeat(1, 6).to(args.device)
            ms_d, _, tokens_d, runs_d = time_generation(model, repetitive, args.new_tokens, args.runs,
                                                        prompt_lookup_num_tokens=args.draft)
            ms_p, _, tokens_p, _ = time_generation(model, repetitive, args.new_tokens, 1, warmup_tokens=0)
            result["drafting"] = dict(ms_per_token=ms_d, tokens_s=1000 / ms_d, plain_ms_per_token=ms_p,
                                      same_tokens=tokens_d == tokens_p, runs_ms=runs_d)
            print(f"[{delay_ms:g} ms] repetitive prompt: drafting {ms_d:.1f} ms/token, plain {ms_p:.1f}",
                  flush=True)
            if first:
                result["forward_tokens_s"] = {f"{b}x{t}": time_forward(model, b, t, args.device, args.runs)
                                              for b, t in ((1, 128), (args.forward_batch, 128))}
                print(f"[{delay_ms:g} ms] forward {result['forward_tokens_s']}", flush=True)
                result["agreement"] = check_agreement(model, config, args, args.quant)
                print(f"[{delay_ms:g} ms] agreement {result['agreement']}", flush=True)
            records = model.swarm.call(model.swarm.servers(refresh=True), 60)
            memory = gpu_memory_by_pid()
            result["servers"] = [dict(span=[r.record.start_block, r.record.end_block],
                                      cache_tokens_total=r.record.cache_tokens_total,
                                      throughput=r.record.throughput) for r in records]
            result["server_gpu_gib"] = [memory.get(process.popen.pid) for process in servers]
        finally:
            model.close()
        if first and args.train:
            lora = LoraSettings(r=8, alpha=16, target_modules=(args.lora_target,))
            model = AutoDistributedModelForCausalLM.from_pretrained(
                config_dir, initial_peers=swarm.initial_peers, dtype=dtype, model_name=name, tuning_mode="lora",
                lora=lora, seed=0).to(args.device)
            try:
                seconds = time_training_step(model, args.train_batch, args.train_tokens, args.device, args.runs)
                result["lora_step"] = dict(seconds=seconds, batch=args.train_batch, tokens=args.train_tokens,
                                           tokens_s=args.train_batch * args.train_tokens / seconds)
                print(f"[{delay_ms:g} ms] LoRA step {seconds:.2f} s", flush=True)
            finally:
                model.close()
        result["client_peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30
                                     if args.device.startswith("cuda") else None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="falcon-180b", choices=sorted(PRESETS))
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's (a GPU too small for "
                                                                  "the whole model; reported as such)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 25, 50])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--draft", type=int, default=8)
    parser.add_argument("--forward-batch", type=int, default=64)
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-tokens", type=int, default=256)
    parser.add_argument("--check-blocks", type=int, default=2)
    parser.add_argument("--cache-tokens", type=int, default=2048)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--server-timeout", type=float, default=600)
    parser.add_argument("--offload-layers", type=int, default=0, help="also measure accelerate's RAM offloading on "
                                                                       "this many bf16 blocks (0: not measured)")
    parser.add_argument("--offload-tokens", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/giant-swarm")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config_class, fields = PRESETS[args.preset]
    if args.layers:
        fields = {**fields, ("n_layer" if config_class is BloomConfig else "num_hidden_layers"): args.layers}
    config = config_class(**fields)
    args.lora_target = "query_key_value"  # both families' fused attention input projection
    workdir = Path(args.workdir)
    began = time.perf_counter()
    config_dir = write_synthetic_checkpoint(config, workdir / args.preset, args.seed, getattr(torch, args.dtype))
    report = {"preset": args.preset, "layers": config.num_hidden_layers, "servers": args.servers, "quant": args.quant,
              "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "checkpoint_s": time.perf_counter() - began, "petals_published": PETALS,
              "offloading": offloading_bound(config, args.device), "runs": []}
    print(json.dumps(report["offloading"], default=str), flush=True)
    if args.offload_layers:
        try:
            report["accelerate_offloading"] = measure_accelerate_offloading(config, args)
        except Exception as e:  # a failure here must not cost the swarm's tables
            report["accelerate_offloading"] = {"error": repr(e)}
        print(f"accelerate offloading: {report['accelerate_offloading']}", flush=True)
    for index, delay in enumerate(args.delays):
        report["runs"].append(run_swarm(config_dir, config, workdir, delay, args, first=index == 0))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


def print_table(report: dict) -> None:
    bound = report["offloading"].get("bound_s_per_token", {})
    print(f"\n{report['preset']} ({report['layers']} layers), {report['quant']}, {report['servers']} servers + client "
          f"on one {report['device']}")
    print("| one-way delay per message | decode ms/token | tokens/s | drafting, repetitive prompt: ms/token (plain) |"
          " x nf4 offloading bound |")
    print("|---|---|---|---|---|")
    for run in report["runs"]:
        decode, draft = run["decode"], run["drafting"]
        ratio = f"{bound['nf4'] * 1000 / decode['ms_per_token']:.0f}x" if bound else "-"
        print(f"| {run['delay_ms']:g} ms | {decode['ms_per_token']:.1f} | {decode['tokens_s']:.2f} | "
              f"{draft['ms_per_token']:.1f} ({draft['plain_ms_per_token']:.1f}) | {ratio} |")
    first = report["runs"][0]
    print(f"forward tokens/s: {first.get('forward_tokens_s')}; LoRA step: {first.get('lora_step')}")
    print(f"agreement with one process: {first.get('agreement')}")
    print(f"servers: {first.get('servers')}; GPU GiB per server: {first.get('server_gpu_gib')}")
    print(f"offloading: {report['offloading']}")
    print(f"accelerate offloading: {report.get('accelerate_offloading')}")


if __name__ == "__main__":
    main()
