"""Server settings: each default is defined here once; the CLI is generated from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    model: str = field(metadata={"help": "local Hugging Face-format model directory, or a Hugging Face Hub repo id "
                                         "OWNER/NAME (only config.json and the shards of the served blocks are "
                                         "fetched, through the Hugging Face cache; HF_HUB_OFFLINE=1 reads only the "
                                         "cache)", "positional": True})
    revision: str | None = field(default=None, metadata={"help": "the Hub revision (branch, tag or commit) of a repo "
                                                                 "id MODEL (default: main)"})
    blocks: str | None = field(default=None, metadata={"help": "span to serve, START:END (END exclusive)"})
    num_blocks: int | None = field(default=None, metadata={"help": "serve this many blocks where the swarm needs "
                                                                   "them most, moving when the swarm needs it "
                                                                   "(default: as many as fit the device memory)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    quant: str = field(default="none", metadata={"help": "weight quantization: none, int8 (CUDA: bitsandbytes; CPU: "
                                                         "torch dynamic int8, float32 only) or nf4 (CUDA only)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, float16 or bfloat16 (default: the "
                                                              "checkpoint's dtype)"})
    model_name: str | None = field(default=None, metadata={"help": "name in the DHT (default: the directory name, "
                                                                   "or NAME of a repo id OWNER/NAME)"})
    adapters: tuple[str, ...] = field(default=(), metadata={"help": "PEFT LoRA adapters to host: local directories "
                                                                    "or repo ids in the offline hub (--hub-dir)"})
    hub_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache directory for repo ids of the "
                                                                "model and adapters (default: $HF_HUB_CACHE, else "
                                                                "$HF_HOME/hub, else ~/.cache/huggingface/hub)"})
    public_name: str = field(default="", metadata={"help": "a name for this server shown on swarm maps"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    cuda_graphs: bool = field(default=True, metadata={"help": "replay single-token decode steps from CUDA graphs "
                                                              "(CUDA, unquantized; --no-cuda-graphs runs every step the "
                                                              "ordinary way)"})
    weight_layout: str = field(default="auto", metadata={"help": "CPU only: how the blocks' linear weights are "
                                                                 "stored and multiplied in one-token steps: auto "
                                                                 "(measure each way for each shape at start-up, keep "
                                                                 "the fastest), row (as loaded), column (the same "
                                                                 "values with transposed strides) or rowdot "
                                                                 "(row-major, one dot product per row, float32)"})
    cache_tokens: int = field(default=32768, metadata={"help": "attention-cache budget, in tokens over all sessions"})
    max_session_length: int | None = field(default=None, metadata={"help": "most tokens one session may hold "
                                                                           "(default: the model's maximum length)"})
    prefill_chunk_tokens: int = field(default=1024, metadata={"help": "longer prompts are run in chunks of this many "
                                                                      "tokens (bounds attention memory)"})
    max_sessions_per_peer: int = field(default=32, metadata={"help": "most open inference sessions of one client"})
    max_request_mb: float = field(default=256.0, metadata={"help": "largest message accepted, in MiB"})
    max_batch_size: int = field(default=64, metadata={"help": "most sequences in one request"})
    max_step_tokens: int = field(default=65536, metadata={"help": "most new tokens (batch x length) in one step"})
    session_idle_timeout: float = field(default=300.0, metadata={"help": "seconds a session may stay silent"})
    rebalance_period: float = field(default=120.0, metadata={"help": "seconds between checks whether moving to "
                                                                     "other blocks would help the swarm (0 = never); "
                                                                     "only without --blocks"})
    throughput_cache: str | None = field(default=None, metadata={"help": "file of measured speeds (default: "
                                                                         "~/.cache/corolla/throughput.json)"})
    announce_period: float = field(default=10.0, metadata={"help": "seconds between DHT announcements"})
    synthetic_weights_seed: int | None = field(default=None, metadata={
        "help": "BENCHMARKS ONLY: ignore the checkpoint's block tensors and build every block from the config with "
                "random weights of this seed, on the device, one block at a time (quantized as made); the model "
                "directory needs only config.json. Such a server computes meaningless text, so it announces the "
                "model as NAME+synthetic<seed>, which normal clients never ask for (corolla/models/synthetic.py)"})
    debug_delay_ms: float = field(default=0.0, metadata={"help": "testing only: add this one-way latency to every "
                                                                 "message received and reply sent (a slow link)"})
    debug_fail_file: str | None = field(default=None, metadata={"help": "testing only: while this file exists, "
                                                                        "every step, forward and backward fails"})
    debug_perturb_outputs: float = field(default=0.0, metadata={"help": "testing only: add Gaussian noise of this "
                                                                        "std to every output (a lying server)"})
    credits: bool = field(default=True, metadata={"help": "under contention, serve sessions of contributors first "
                                                          "(signed work receipts; docs/incentives.md); "
                                                          "--no-credits serves first come, first served"})
    trusted_peers: tuple[str, ...] = field(default=(), metadata={"help": "peer ids trusted outright for credits: "
                                                                         "your own client keys, friends' servers"})
    credits_ledger: str | None = field(default=None, metadata={"help": "SQLite file of this server's receipts and "
                                                                       "served work (default: "
                                                                       "~/.cache/corolla/credits/<peer id>.sqlite)"})
    wait_for_swarm: float = field(default=10.0, metadata={"help": "seconds to wait for the DHT when choosing blocks"})
