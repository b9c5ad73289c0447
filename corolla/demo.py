"""`corolla demo`: a private swarm on this machine (bootstrap peer + servers on 127.0.0.1), the OpenAI-compatible
API with its web chat and swarm map over it, one chat turn streamed to the terminal, then a clean shutdown (also
on Ctrl-C). With `serve=True` the swarm and the API stay up after the answer until Ctrl-C."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from corolla.launch import LocalSwarm, split_blocks


def run_demo(model: str | None, prompt: str, servers: int, max_new_tokens: int, workdir: str | None,
             serve: bool = False, api_port: int = 0) -> None:
    from transformers import AutoTokenizer, TextStreamer

    from corolla.api.app import ApiServer, create_app
    from corolla.api.config import ApiConfig
    from corolla.api.served import ServedModel
    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import load_config
    from corolla.models.embedded import ensure_embedded_model
    from corolla.models.hub_source import open_model

    model_dir = Path(model) if model else ensure_embedded_model()
    num_blocks = load_config(open_model(model_dir).directory).num_hidden_layers  # a directory or a Hub repo id
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="corolla-demo-"))
    spans = split_blocks(num_blocks, servers)
    print(f"Starting a private swarm on 127.0.0.1: 1 bootstrap peer + {len(spans)} servers "
          f"(logs in {workdir})", flush=True)
    client = served = api = None
    with LocalSwarm(workdir) as swarm:
        try:
            peers = swarm.start_dht()
            began = time.perf_counter()
            processes = [swarm.start_server(model_dir, span, f"server{i}", ["--num-threads", "1"], wait=False)
                         for i, span in enumerate(spans)]
            with tqdm(total=len(processes), desc="servers loading their blocks", unit="server",
                      disable=not sys.stderr.isatty(), leave=False) as bar:
                for process in processes:
                    swarm.wait_for_line(process, "ready:", timeout=180)
                    bar.update()
            print(f"{len(spans)} servers ready in {time.perf_counter() - began:.1f} s", flush=True)
            client = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=peers)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)

            config = ApiConfig(model=str(model_dir), port=api_port)
            served = ServedModel.create(client, tokenizer, client.swarm_name, config)
            api = ApiServer(create_app(served, config.state_refresh), config.host, config.port)
            url = api.start()
            print(f"API: {url}/v1 (OpenAI-compatible, model {served.name!r}); chat page: {url}/ ; "
                  f"swarm map: {url}/swarm", flush=True)

            messages = [{"role": "user", "content": prompt}]
            input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"]
            print(f"\nUser: {prompt}\nAssistant: ", end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            with client.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
                began = time.perf_counter()
                output = client.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                         streamer=streamer)
                elapsed = time.perf_counter() - began
                route = session.route
            new_tokens = output.shape[1] - input_ids.shape[1]
            print("\nRoute:")
            names = {p.log_path.stem: p for p in processes}
            for hop in route:
                server = next((n for n, p in names.items() if hop.peer_id in p.log()), "?")
                print(f"  blocks {hop.start:>3}..{hop.end - 1:<3} served by {server} ({hop.peer_id})")
            print(f"{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s "
                  f"(prompt of {input_ids.shape[1]} tokens included)", flush=True)
            if serve:
                print(f"Serving the API at {url}/v1 (chat page: {url}/) until Ctrl-C ...", flush=True)
                while True:
                    time.sleep(0.5)
            print("(`corolla demo --serve` keeps the swarm, the API and its pages up until Ctrl-C)", flush=True)
        except KeyboardInterrupt:
            print("\nInterrupted: stopping the swarm", flush=True)
        finally:
            if api is not None:
                api.stop()
            if served is not None:
                served.close()
            if client is not None:
                client.close()
            print("Stopping servers and the bootstrap peer ...", flush=True)
    print("Done.", flush=True)
