"""Where speculative decoding on the GPU departs from plain decoding: one scenario (the fp32
token-identity test's: tiny-qwen3, 8 prompts x 4 samples, 96 tokens, greedy, drafts from an
earlier run) under switches that each take one suspect out — verify graphs, the Triton attention,
the Triton sampler and fused ops, overlap scheduling, the prefix cache.

    python scripts/gpu_spec_diag.py [--device cuda] [--dtype float32]

Per configuration: sequences where spec != plain, where plain != history (greedy: seeds do not
matter, so plain must equal the earlier run) and spec != history, the first divergence of each,
and the accepted draft tokens. JSON to $OUT/gpu_spec_diag.json; a table last.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from repo_path import expose_repo

CONFIGS: dict[str, dict] = {
    "default": {},
    "dump_default": {"dump": True},
    "dump_ref": {
        "cuda_graph": False,
        "overlap_schedule": False,
        "dump": True,
        "env": {"ROLLOUT_ACCEL_ATTENTION": "reference", "ROLLOUT_ACCEL_SAMPLING": "reference"},
    },
    "no_verify_graphs": {"env": {"ROLLOUT_ACCEL_VERIFY_GRAPHS": "0"}},
    "no_graphs": {"cuda_graph": False},
    "no_overlap": {"overlap_schedule": False},
    "draft_cost_0.1": {"speculative_draft_cost": 0.1},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "flush_between": {"flush": True},
    "ref_attention": {"env": {"ROLLOUT_ACCEL_ATTENTION": "reference"}},
    "ref_sampling_fused": {
        "env": {"ROLLOUT_ACCEL_SAMPLING": "reference", "ROLLOUT_ACCEL_FUSED": "reference"}
    },
    "all_reference_no_graphs": {
        "cuda_graph": False,
        "env": {
            "ROLLOUT_ACCEL_ATTENTION": "reference",
            "ROLLOUT_ACCEL_SAMPLING": "reference",
            "ROLLOUT_ACCEL_FUSED": "reference",
            "ROLLOUT_ACCEL_REROTATE": "reference",
        },
    },
}
PROMPTS, SAMPLES, NEW = 8, 4, 96


def _first(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def _compare(a: list[dict], b: list[dict]) -> dict:
    firsts = [_first(x["output_ids"], y["output_ids"]) for x, y in zip(a, b, strict=True)]
    bad = [f for f in firsts if f is not None]
    detail = []
    for seq, f in enumerate(firsts):
        if f is None or len(detail) >= 4:
            continue
        la = a[seq]["meta_info"]["output_token_logprobs"][f]
        lb = b[seq]["meta_info"]["output_token_logprobs"][f]
        detail.append({"seq": seq, "at": f, "a": la[:2], "b": lb[:2]})
    return {"diverged": len(bad), "first": sorted(bad)[:8], "detail": detail}


def run_config(name: str, cfg: dict, device: str, dtype: str) -> dict:
    import torch

    from rollout_accel.kernels.backend import reload_overrides
    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.spec import CORPUS_FIELD

    saved = {k: os.environ.get(k) for k in cfg.get("env", {})}
    os.environ.update(cfg.get("env", {}))
    reload_overrides()
    kwargs = {k: v for k, v in cfg.items() if k not in ("env", "flush", "dump")}
    eng = None
    try:
        eng = Engine(
            "tiny-qwen3",
            device=device,
            dtype=dtype,
            max_running_requests=PROMPTS * SAMPLES,
            speculative_algorithm="NGRAM",
            speculative_num_draft_tokens=5,
            **kwargs,
        )
        with torch.no_grad():
            eng.model.model.norm.weight.mul_(64.0)

        def run(seed: int, active: bool) -> list[dict]:
            if cfg.get("flush"):
                eng.flush_cache()
            eng.spec.active = active
            gen = torch.Generator().manual_seed(5)
            prompts = [torch.randint(3, 400, (20,), generator=gen).tolist() for _ in range(PROMPTS)]
            ids = [p for p in prompts for _ in range(SAMPLES)]
            params = [
                {
                    "max_new_tokens": NEW,
                    "ignore_eos": True,
                    "temperature": 0.0,
                    "sampling_seed": seed + i,
                    "custom_params": {CORPUS_FIELD: f"p{i // SAMPLES}"},
                }
                for i in range(len(ids))
            ]
            tag = "spec" if active else f"run{seed}"
            return eng.generate(
                input_ids=ids,
                sampling_params=params,
                return_logprob=True,
                rid=[f"{tag}-{i}" for i in range(len(ids))],
            )

        trace: list[list] = []
        commit = eng.scheduler._commit

        def traced_commit(batch):  # the step log: (rid, start, count, prefill, drafts) per item
            trace.append(
                [
                    [it.request.rid, it.start, it.count, it.is_prefill, len(it.draft or [])]
                    for it in batch.items
                ]
            )
            return commit(batch)

        eng.scheduler._commit = traced_commit

        history = run(10_000, False)
        for p in range(PROMPTS):
            docs = [history[p * SAMPLES + s]["output_ids"] for s in range(SAMPLES)]
            eng.spec.registry.add(f"p{p}", token_chunks=docs)
        eng.spec.proposer.groups.clear()
        spec = run(0, True)
        plain = run(0, False)
        graphs = getattr(eng.runner, "verify_graphs", None)
        row = {
            "config": name,
            "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()],
            "decode_graphs_stale": bool(eng.runner.graphs is not None and eng.runner.graphs.stale),
            "spec_vs_plain": _compare(spec, plain),
            "plain_vs_history": _compare(plain, history),
            "spec_vs_history": _compare(spec, history),
            "accepted": eng.spec.totals.accepted_tokens,
            "verify_replays": graphs.replays if graphs is not None else 0,
        }
        if cfg.get("dump"):
            row["outputs"] = {
                "history": [h["output_ids"][:12] for h in history],
                "spec": [h["output_ids"][:12] for h in spec],
                "plain": [h["output_ids"][:12] for h in plain],
            }
            row["trace"] = trace
    except Exception as exc:  # a failing configuration is a finding, not the end of the run
        row = {"config": name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if eng is not None:
            eng.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_overrides()
    print(json.dumps(row), flush=True)
    return row


def probe_capture(dtype: str) -> None:
    """Captures the decode graphs of an engine built without them, with synchronising calls
    made errors: a capture that fails names the offending call in its traceback."""
    import traceback

    import torch

    from rollout_accel.serving.engine import Engine
    from rollout_accel.serving.engine.cuda_graphs import DecodeGraphs

    eng = Engine("tiny-qwen3", device="cuda", dtype=dtype, cuda_graph=False, max_running_requests=8)
    try:
        graphs = DecodeGraphs(eng.model, eng.kv_cache, eng.table, 8)
        torch.cuda.set_sync_debug_mode("error")
        graphs.capture()
        print("probe: capture ok", flush=True)
    except Exception:
        traceback.print_exc()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    expose_repo()
    if args.device == "cuda":
        probe_capture(args.dtype)
    rows = [run_config(n, CONFIGS[n], args.device, args.dtype) for n in args.configs.split(",")]
    out = Path(os.environ.get("OUT", "."))
    (out / "gpu_spec_diag.json").write_text(json.dumps(rows, indent=1))
    print(f"{'config':26} {'spec!=plain':>11} {'plain!=hist':>11} {'spec!=hist':>10} {'acc':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:26} ERROR {r['error'][:80]}")
            continue
        print(
            f"{r['config']:26} {r['spec_vs_plain']['diverged']:>11} "
            f"{r['plain_vs_history']['diverged']:>11} {r['spec_vs_history']['diverged']:>10} "
            f"{r['accepted']:>5}  first={r['spec_vs_plain']['first'][:4]}"
        )


if __name__ == "__main__":
    main()
