"""One-off: does letting vLLM's CPU worker use both cores (VLLM_CPU_NUM_OF_RESERVED_CPU=0) speed up sentiment
requests through the gateway? Rounds A B B A, 150 held-out tweets at 16 in flight, sentiment@1 (LoRA)."""
import asyncio, os, sys, time
sys.path.insert(0, "/work/main")
ws = sys.argv[1]
os.chdir(ws)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TUNELOOP_ADMIN_TOKEN", "exp")
import httpx
from challenger_sets.catalog import get_dataset
from serving.server import running_server
from tuneloop.config import load_config
from tuneloop.store import Store

config = load_config("tuneloop.yaml")
store = Store(config.resolved_database_url)
texts = [e.input_text() for e in get_dataset(store, "sentiment/heldout").load()[:150]]

async def send(url):
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(t):
            async with sem:
                r = await client.post(f"{url}/v1/chat/completions", json={"model": "sentiment", "messages": [{"role": "user", "content": t}], "max_tokens": 4, "temperature": 0})
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"]
        await one(texts[0])  # warm-up
        start = time.perf_counter()
        answers = await asyncio.gather(*(one(t) for t in texts))
        return time.perf_counter() - start, answers

results = {}
for variant in ("reserved1", "reserved0", "reserved0", "reserved1"):
    if variant == "reserved0":
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    else:
        os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    with running_server(config, store, seed=0) as running:
        seconds, answers = asyncio.run(send(running.url))
    results.setdefault(variant, []).append((seconds, answers))
    print(variant, f"{len(texts)/seconds:.2f} req/s", flush=True)
a = sum(s for s, _ in results["reserved1"]); b = sum(s for s, _ in results["reserved0"])
print(f"reserved0 / reserved1 throughput: {a/b:.2f}x; same answers: {results['reserved0'][0][1] == results['reserved1'][0][1]}")
