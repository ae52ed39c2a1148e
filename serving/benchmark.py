"""Engine vs Hugging Face transformers `generate`, same weights, same workload, one run.

    python -m rollout_accel.serving.benchmark [--preset tiny-qwen3] [--num-seqs 64] [--out FILE]

Workload (seeded, fixed): `num_seqs` concurrent sequences, prompt lengths uniform in
[16, 256], output lengths log-normal (median 64, sigma 0.8) clipped to [8, 512], ignore_eos so
each sequence produces exactly its length. transformers runs the whole batch as one left-padded
`generate` call (its standard batched path), so it decodes until the longest sequence is done;
both sides are credited only with the requested tokens. Prints output tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from rollout_accel.serving.engine import Engine
from rollout_accel.serving.models import materialize_preset


@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def mixed_workload(num_seqs: int, seed: int = 0, vocab: int = 500) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(16, 257, (num_seqs,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    normal = torch.randn(num_seqs, generator=gen)
    outs = (
        torch.exp(torch.log(torch.tensor(64.0)) + 0.8 * normal).round().clamp(8, 512).int().tolist()
    )
    return Workload(prompts, outs)


def run_engine(engine: Engine, work: Workload) -> float:
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in work.output_lens]
    start = time.perf_counter()
    outs = engine.generate(input_ids=work.prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    produced = sum(o["meta_info"]["completion_tokens"] for o in outs)
    if produced != work.output_tokens:
        raise RuntimeError(f"engine produced {produced} tokens, expected {work.output_tokens}")
    return elapsed


def run_transformers(model, work: Workload, pad_id: int) -> float:
    width = max(len(p) for p in work.prompts)
    ids = torch.full((len(work.prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(work.prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max(work.output_lens),
            do_sample=False,
            pad_token_id=pad_id,
        )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny-qwen3", help="model preset (random weights)")
    parser.add_argument("--num-seqs", type=int, default=64, help="concurrent sequences")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    import transformers

    work = mixed_workload(args.num_seqs, args.seed)
    warm = mixed_workload(8, args.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = materialize_preset(args.preset, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # same as ignore_eos on our side
        with Engine(str(path), max_running_requests=max(args.num_seqs, 8)) as engine:
            run_engine(engine, warm)
            run_transformers(hf, Workload(warm.prompts, [8] * 8), pad_id=0)
            engine.flush_cache()
            ours = run_engine(engine, work)
        theirs = run_transformers(hf, work, pad_id=0)
    result = {
        "preset": args.preset,
        "num_seqs": args.num_seqs,
        "output_tokens": work.output_tokens,
        "engine_seconds": ours,
        "transformers_seconds": theirs,
        "engine_tokens_per_s": work.output_tokens / ours,
        "transformers_tokens_per_s": work.output_tokens / theirs,
        "ratio": theirs / ours,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "workload": asdict(work) | {"prompts": [len(p) for p in work.prompts]},
    }
    print(f"{'path':<28}{'seconds':>10}{'out tok/s':>12}")
    print(f"{'rollout-accel engine':<28}{ours:>10.2f}{result['engine_tokens_per_s']:>12.0f}")
    print(
        f"{'transformers generate':<28}{theirs:>10.2f}{result['transformers_tokens_per_s']:>12.0f}"
    )
    print(f"ratio (engine / transformers): {result['ratio']:.2f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
