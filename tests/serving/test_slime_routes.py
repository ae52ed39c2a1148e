"""The routes slime calls on an external engine, with slime's exact bodies, over real HTTP."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from rollout_accel.serving.models import load_model
from rollout_accel.serving.server import ServerThread, free_port
from rollout_accel.serving.server.protocol import serialize_named_tensors as ser
from rollout_accel.serving.server.server_args import ServerArgs

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    args = ServerArgs(enable_memory_saver=True)
    with ServerThread(model_path="tiny-qwen3", server_args=args) as srv:
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_server_info_has_what_slime_reads_and_checks(server, http) -> None:
    for path in ("/server_info", "/get_server_info"):
        info = http.get(path).json()
        # slime's discover_external_engines / ExternalEngineInfo.parallel_config
        assert (info["tp_size"], info["pp_size"], info["dp_size"]) == (1, 1, 1)
        assert (info["ep_size"], info["moe_dp_size"]) == (1, 1)
        assert info["num_gpus"] == 0  # CPU engine; slime falls back to tp*pp = 1
        assert info["disaggregation_mode"] == "null"
        assert info["disaggregation_bootstrap_port"] is None
        assert info["encoder_only"] is False
        # slime's external_engine_need_check_fields
        assert info["enable_memory_saver"] is True
        assert info["enable_return_routed_experts"] is False
        assert info["dtype"] == "auto" and info["model_dtype"] == "float32"
        assert info["model_path"] == "tiny-qwen3"
        assert info["port"] == server.port
        assert info["weight_version"] == "default"
        assert info["internal_states"][0]["max_total_num_tokens"] == info["max_total_num_tokens"]


def test_weights_checker_snapshot_reset_compare_checksum(http) -> None:
    prompt = {"input_ids": [3, 4, 5], "sampling_params": GREEDY}
    before = http.post("/generate", json=prompt).json()["output_ids"]
    checksum = http.post("/weights_checker", json={"action": "checksum"}).json()
    assert checksum["success"] and len(checksum["ranks"][0]["per_gpu_checksum"]) == 64
    assert http.post("/weights_checker", json={"action": "snapshot"}).json()["success"]
    assert http.post("/weights_checker", json={"action": "compare"}).json()["success"]
    assert http.post("/weights_checker", json={"action": "reset_tensors"}).json()["success"]
    failed = http.post("/weights_checker", json={"action": "compare"})
    assert failed.status_code == 400 and "check tensor equality failed" in failed.json()["message"]
    changed = http.get("/weights_checker", params={"action": "checksum"}).json()
    assert changed["ranks"][0]["per_gpu_checksum"] != checksum["ranks"][0]["per_gpu_checksum"]
    bad = http.post("/weights_checker", json={"action": "nope"})
    assert bad.status_code == 400 and "action" in bad.text
    # Push the seed-0 weights back through the tensor path (slime's body): compare passes again.
    named = list(load_model("tiny-qwen3", seed=0).model.named_parameters())
    r = http.post(
        "/update_weights_from_tensor",
        json={"serialized_named_tensors": [ser(named)], "load_format": None, "flush_cache": False},
    )
    assert r.status_code == 200 and r.json()["success"], r.text
    assert http.post("/weights_checker", json={"action": "compare"}).json()["success"]
    assert http.post("/generate", json=prompt).json()["output_ids"] == before


def test_post_process_pull_weights_and_profiler(http, tmp_path) -> None:
    body = {"restore_weights_before_load": True, "post_process_quantization": False}
    assert http.post("/post_process_weights", json=body).json()["success"]
    assert http.post("/post_process_weights", json={"x": 1}).status_code == 400
    pull = http.post(
        "/pull_weights",
        json={"local_checkpoint_dir": "/x", "source_dir": "/y", "target_version": 1},
    )
    assert pull.status_code == 400 and "not supported" in pull.json()["message"]
    # slime's start_profile body, every key present (None where unset).
    start = {
        "output_dir": str(tmp_path),
        "start_step": None,
        "num_steps": None,
        "activities": None,
        "profile_by_stage": False,
        "with_stack": None,
        "record_shapes": None,
    }
    assert http.post("/start_profile", json=start).status_code == 200
    assert http.post("/start_profile", json=start).status_code == 400  # one session at a time
    http.post("/generate", json={"input_ids": [1, 2], "sampling_params": GREEDY})
    assert http.post("/stop_profile", json={}).status_code == 200
    (trace,) = tmp_path.glob("*-TP-0.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)
    assert http.post("/stop_profile", json={}).status_code == 400
    assert http.post("/start_profile", json={**start, "num_steps": 3}).status_code == 400


def test_flush_cache_refused_while_busy(server, http) -> None:
    """SGLang's semantics, which slime's flush_cache loop relies on: 400 while requests run or
    wait, 200 once paused (abort mode) or idle."""
    body = {"input_ids": [4, 5], "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    done: list[dict] = []
    worker = threading.Thread(
        target=lambda: done.append(httpx.post(f"{server.url}/generate", json=body, timeout=120))
    )
    worker.start()
    while server.engine.get_loads()["num_running_reqs"] == 0:
        time.sleep(0.01)
    assert http.get("/flush_cache").status_code == 400
    assert http.post("/pause_generation", json={}).json()["status"] == "ok"
    worker.join(timeout=60)
    assert done[0].json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert http.get("/flush_cache").status_code == 200
    assert server.engine.get_loads()["num_cached_tokens"] == 0
    assert http.post("/continue_generation", json={}).status_code == 200


def test_control_routes_take_slime_bodies(http) -> None:
    """The bodies slime's SGLangEngine sends, and the answers it parses (it calls .json())."""
    assert http.get("/flush_cache").status_code == 200
    assert http.post("/pause_generation", json={}).json()["status"] == "ok"
    released = http.post("/release_memory_occupation", json={})
    assert released.status_code == 200 and released.json() is None
    assert http.post("/weights_checker", json={"action": "checksum"}).status_code == 400
    for tags in (["weights"], ["kv_cache", "cuda_graph"]):
        resumed = http.post("/resume_memory_occupation", json={"tags": tags})
        assert resumed.status_code == 200 and resumed.json() is None
    assert http.post("/continue_generation", json={}).json()["status"] == "ok"
    assert http.post("/release_memory_occupation", json={}).status_code == 200
    assert http.post("/resume_memory_occupation", json={"tags": None}).status_code == 200
    out = http.post("/generate", json={"input_ids": [1, 2], "sampling_params": GREEDY}).json()
    assert out["meta_info"]["completion_tokens"] == 8
    r = http.post("/update_weights_from_disk", json={"model_path": "/nonexistent"})
    assert r.status_code == 400 and not r.json()["success"]
    r = http.post("/destroy_weights_update_group", json={"group_name": "slime-pp_0"})
    assert r.status_code == 400 and "slime-pp_0" in r.json()["message"]


def test_rollout_serve_cli_flags() -> None:
    """SGLang's names on the real CLI: accepted ones reach /server_info, unsupported ones are
    refused naming the flag."""
    refused = subprocess.run(
        [sys.executable, "-m", "rollout_accel.rollout.cli", "serve", "--tp-size", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--tp-size=2" in refused.stderr
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "rollout_accel.rollout.cli",
        "serve",
        "--model-path",
        "tiny-qwen3",
        "--port",
        str(port),
        "--context-length",
        "512",
        "--mem-fraction-static",
        "0.5",
        "--max-running-requests",
        "16",
        "--schedule-policy",
        "lpm",
        "--tensor-parallel-size",
        "1",
        "--random-seed",
        "3",
        "--enable-memory-saver",
        "--weight-version",
        "v0",
        "--trust-remote-code",
        "--skip-server-warmup",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=5).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.time() < deadline
                time.sleep(0.3)
        assert info["context_length"] == 512 and info["mem_fraction_static"] == 0.5
        assert info["max_running_requests"] == 16 and info["schedule_policy"] == "lpm"
        assert info["random_seed"] == 3 and info["enable_memory_saver"] is True
        assert info["weight_version"] == "v0" and info["tp_size"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
