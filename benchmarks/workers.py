"""Side-by-side benchmark plumbing: a worker process per tool, spoken to one line at a time."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 151936  # a real vocabulary (Qwen2's): the demo's 1 k hides the output head's cost


def rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry over the
    launching process's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    """A worker process started with `cmd`: it prints one JSON line when ready and one per
    command; `rss` answers its peak RSS. Lines that are not JSON (a library's prints) are skipped."""

    def __init__(self, cmd: list[str], quiet: bool = False):
        self.p = subprocess.Popen(
            [str(c) for c in cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None, text=True,
        )  # fmt: skip
        self.ready = self.read()

    def read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"benchmark worker {self.p.args[1:4]} ended: run it by hand to see why"
                )
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> dict:
        rss = self.ask("rss")
        self.p.stdin.close()
        self.p.wait()
        return rss


def demo_and_large_models(tmp: Path) -> dict[str, Path]:
    """The model pair of the activation and intervention benchmarks, with the demo tokenizer: the
    demo model, and a randomly initialised Qwen2 of a realistic shape (8 layers, hidden 512, the
    151 936-token vocabulary; the shapes of benchmarks/score_vs_lmeval.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from reasonlab import demo, synth

    data = synth.build_demo_data(
        0, synth.DemoSizes(pool_per_type=20, eval=20, control=10, pretrain=300)
    )
    demo.build_tokenizer(synth.corpus_texts(data), tmp / "tok", vocab_size=1024)
    large = demo.TinyModelSpec(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=4, intermediate_size=1024)  # fmt: skip
    demo.build_tiny_model(tmp / "tok", tmp / "demo", demo.TinyModelSpec(), seed=0)
    demo.build_tiny_model(tmp / "tok", tmp / "large", large, seed=0, vocab_size=VOCAB)
    return {"demo": tmp / "demo", "large": tmp / "large"}


def demo_prompts(model_dir: str, n: int) -> list[list[int]]:
    """n distinct chat-formatted demo problems as token ids."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from transformers import AutoTokenizer

    from reasonlab import synth

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = synth.build_demo_data(
        0, synth.DemoSizes(pool_per_type=n // 4 + 50, eval=n, control=10, pretrain=10)
    )
    seen, out = set(), []
    for r in data["eval"] + data["pool"]:
        q = r.get("problem") or r.get("input")
        if q in seen:
            continue
        seen.add(q)
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
        out.append(tok(text, add_special_tokens=False)["input_ids"])
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} distinct demo problems; ask for fewer prompts")


def alternate(fns: dict, runs: int, device: str = "cpu") -> tuple[dict, dict]:
    """Time each of `fns` (name -> callable) `runs` times in one process, alternating their order
    run by run (so that drift favours neither), synchronising the GPU around each call on a CUDA
    `device`: ({name: [seconds, ...]}, {name: its last result})."""

    def sync():
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    names = list(fns)
    times, got = {n: [] for n in names}, {}
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            got[name] = fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times, got
