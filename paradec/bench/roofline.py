"""The machine's limit: how fast a decode could be if it did nothing but move the bytes and do the
arithmetic it must, at this machine's measured memory bandwidth and matmul throughput.

Invariant: a limit is a lower bound on time. Each forward costs at least
``max(bytes / bandwidth, flops / throughput)``, where ``bytes`` is what it must read (every weight
once, plus the KV cache it attends, each stored token once) and ``flops`` what it must compute
(2 per weight per fed token, the logits of the rows that need them, and the attention of each
fed token to the keys it must see); every count here is the least a mode's own shapes need.
A mode's limit is the sum over its forwards; its achieved fraction is limit / measured time.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from ..prompts import JOINT_LINE_TOKENS
from .clocks import WALL, now, since


@dataclass
class Machine:
    """This machine's measured limits at the benchmark's thread count."""

    read_bytes_per_s: float  # reading a tensor far larger than the caches (a sum over it)
    copy_bytes_per_s: float  # read + write of a large tensor copy (reported beside)
    matmul_flops_per_s: float  # a large square fp32 matmul
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure_machine(clock: int = WALL, device: str = "cpu", repeats: int = 5, size_mib: int = 512,
                    matmul_n: int = 2048) -> Machine:
    """Read and copy bandwidth of a ``size_mib`` MiB fp32 tensor, and the throughput of a
    ``matmul_n``-square fp32 matmul, on ``device``: medians of ``repeats`` after one warm-up, on
    ``clock`` (WALL or CPU: the benchmark's ratio clock)."""
    x = torch.ones(size_mib * 2 ** 20 // 4, device=device)
    y = torch.empty_like(x)
    a = torch.randn(matmul_n, matmul_n, device=device)
    b = torch.randn(matmul_n, matmul_n, device=device)

    def rate(work: float, fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = now()
            fn()
            times.append(since(start)[clock])
        return work / statistics.median(times)

    nbytes = x.numel() * x.element_size()
    return Machine(read_bytes_per_s=rate(nbytes, x.sum),
                   copy_bytes_per_s=rate(2 * nbytes, lambda: y.copy_(x)),
                   matmul_flops_per_s=rate(2 * matmul_n ** 3, lambda: a @ b),
                   threads=torch.get_num_threads())


@dataclass
class ModelCosts:
    """What one token costs a model, from its config and weights."""

    weight_bytes: int  # every parameter, read once per forward
    token_flops: int  # 2 x the weights a fed token multiplies (every matrix but the embedding lookup and the output head)
    logit_flops: int  # 2 x hidden x vocabulary: one row of logits
    kv_bytes_per_token: int  # keys and values of one token in every layer
    pair_flops: int  # attention of one query to one key: 4 x heads x head_dim x layers (scores and values)

    @classmethod
    def of(cls, model) -> "ModelCosts":
        from ..rope import unwrap_model

        base = unwrap_model(model)
        config = base.config
        weights = list(base.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in weights)
        embed = base.get_input_embeddings().weight
        head = base.get_output_embeddings().weight
        matrices = sum(p.numel() for p in weights if p.dim() >= 2
                       and p.data_ptr() not in (embed.data_ptr(), head.data_ptr()))
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        layers = int(config.num_hidden_layers)
        return cls(weight_bytes=weight_bytes, token_flops=2 * matrices,
                   logit_flops=2 * head.numel(),
                   kv_bytes_per_token=2 * layers * kv_heads * head_dim * embed.element_size(),
                   pair_flops=4 * heads * head_dim * layers)

    def forward_s(self, machine: Machine, fed: int, logits: int, kv_read: int,
                  pairs: int) -> float:
        """The least time of one forward feeding ``fed`` tokens, computing ``logits`` rows,
        reading ``kv_read`` cached tokens and attending ``pairs`` (query, key) pairs."""
        nbytes = self.weight_bytes + kv_read * self.kv_bytes_per_token
        flops = self.token_flops * fed + self.logit_flops * logits + self.pair_flops * pairs
        return max(nbytes / machine.read_bytes_per_s, flops / machine.matmul_flops_per_s)


def causal_pairs(length: int, context: int = 0) -> int:
    """(query, key) pairs of a causal prefill of ``length`` tokens; with ``context`` > 0, a
    lower bound for a layout whose first ``context`` tokens are causal and whose others each see
    at least the context and themselves."""
    if not context:
        return length * (length + 1) // 2
    return context * (context + 1) // 2 + (length - context) * (context + 1)


def mode_limits(costs: ModelCosts, machine: Machine, mode: str, N: int, K: int, q: int, T: int,
                questions: int) -> tuple[float, float]:
    """``(prefill_s, steps_s)``: the least time of one context's decode in ``mode`` with a context
    of ``N`` tokens, ``K`` questions of ``q`` tokens (``questions`` of them answered, for the
    modes that answer one at a time) and ``T`` new tokens per answer (EOS ignored)."""
    f = costs.forward_s
    if mode == "parallel":  # one prefill of every prompt; a step feeds a token per branch
        prefill = f(machine, N + K * q, K, 0, causal_pairs(N + K * q, N))
        steps = sum(f(machine, K, K, N + K * (q + t), K * (N + q + t)) for t in range(1, T))
        return prefill, steps
    if mode in ("sequential", "baseline"):  # each question alone, after its context
        prefill = f(machine, N + q, 1, 0, causal_pairs(N + q))
        steps = sum(f(machine, 1, 1, N + q + t, N + q + t) for t in range(1, T))
        return questions * prefill, questions * steps
    if mode in ("prefix", "batched"):  # a row per question; the steps read every row's cache
        if mode == "prefix":  # the context once, then the questions against its K copies
            prefill = (f(machine, N, 1, 0, causal_pairs(N))
                       + f(machine, K * q, K, K * N, K * (q * N + causal_pairs(q))))
        else:  # the context in every row
            prefill = f(machine, K * (N + q), K, 0, K * causal_pairs(N + q))
        steps = sum(f(machine, K, K, K * (N + q + t), K * (N + q + t)) for t in range(1, T))
        return prefill, steps
    if mode == "joint":  # one sequence: the questions in a row, then every answer in turn
        prompt = N + K * q
        new = K * (T + JOINT_LINE_TOKENS)
        prefill = f(machine, prompt, 1, 0, causal_pairs(prompt))
        steps = sum(f(machine, 1, 1, prompt + t, prompt + t) for t in range(1, new))
        return prefill, steps
    raise ValueError(f"no limit for mode {mode!r}")
