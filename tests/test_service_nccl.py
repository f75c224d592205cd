"""The disaggregated service with ``--kv-transport nccl`` (gloo between CPU workers), end to end.

Real Ray actors, real gRPC, KV blocks over torch.distributed pair groups. Outputs must equal
the colocated engine's (itself checked against transformers in test_engine.py, and here once
more on one prompt); the pair group is built once and kept; nothing leaks.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve_client import Client
from tests.service import ServiceThread

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def nccl_svc():
    service = ServiceThread("tiny", 1, 1, api_key=None, kv_transport="nccl")
    yield service
    service.stop()


def test_greedy_over_nccl_transport_equals_colocated_and_transformers(nccl_svc) -> None:
    from transformers import AutoModelForCausalLM

    rng = random.Random(1)
    # Mixed lengths: under one block, a few blocks, and prompts prefilled in 2-3 chunks of
    # 256 tokens whose blocks stream while the rest is computed.
    lengths = [1, 5, 15, 16, 17, 40, 130, 300, 700]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    prompts.append("In a hole in the ground there lived a hobbit. " * 4)
    llm = LLM(model="tiny", dtype="float32", device="cpu")
    expected = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0,
                                                    ignore_eos=True))

    def run(prompt: list[int] | str) -> list[int]:
        with Client(nccl_svc.target) as client:
            got = client.generate(prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
            return list(got.token_ids)

    with ThreadPoolExecutor(4) as pool:  # concurrent requests share the pair's one group
        results = list(pool.map(run, prompts))
    for got, ref in zip(results, expected, strict=True):
        assert got == ref.token_ids, f"prompt of {len(ref.prompt_token_ids)} tokens"

    model = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32)
    ids = torch.tensor([expected[7].prompt_token_ids])
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                        do_sample=False)
    assert hf[0, ids.shape[1]:].tolist() == results[7]

    stats = nccl_svc.wait_idle()
    assert all(s["num_used_blocks"] == 0 for s in stats.values())
    prefill, decode = stats["prefill-0"], stats["decode-0"]
    assert prefill["kv_transport"] == decode["kv_transport"] == "nccl"
    assert prefill["kv_backend"] == "gloo"
    assert prefill["kv_send_links_built"] == 1  # one group for the pair, kept
    assert decode["kv_receive_groups"] == decode["kv_receive_groups_built"] == 1
    assert prefill["kv_active_sends"] == decode["kv_active_receives"] == 0
