"""--distributed-executor-backend external_launcher: torchrun starts every rank of
`tokenmill serve`; rank 0 serves HTTP, the others join through torchrun's env://
rendezvous and follow. The answer equals one process's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import free_port
from tokenmill import LLM, SamplingParams


def test_torchrun_ranks_serve_what_one_process_does(tiny_hf_model_dir, tmp_path: Path) -> None:
    directory = str(tiny_hf_model_dir("llama"))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None, "torch installs torchrun beside python"
    port = free_port()
    log = tmp_path / "torchrun.log"
    command = [
        torchrun, "--standalone", "--nproc-per-node", "2", "-m", "tokenmill.server.cli",
        "serve", directory, "--tensor-parallel-size", "2", "--distributed-executor-backend",
        "external_launcher", "--host", "127.0.0.1", "--port", str(port), "--dtype",
        "float32", "--kv-cache-memory", "32MiB",
    ]  # fmt: skip
    with log.open("wb") as out:
        launcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert launcher.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        body = {"model": directory, "prompt": "The weather today is", "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        served = response.json()["choices"][0]
        text = log.read_text()
        assert "tensor parallel: 2 ranks (gloo, external_launcher)" in text
        assert "rank 1 of 2 (external launcher)" in text
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    one = LLM(directory, dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert (
        served["token_ids"]
        == one.generate([{"prompt_token_ids": served["prompt_token_ids"]}], params)[0]
        .outputs[0]
        .token_ids
    )
