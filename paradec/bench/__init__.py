"""stage=bench: what parallel decoding buys, measured side by side in one process.

Modules: :mod:`.clocks` (the two clocks and medians), :mod:`.decode` (the decoding workload,
its modes through :func:`paradec.evaluation.run_mode`, and the bare-forward limit),
:mod:`.training_step` (columnar vs causal step), :mod:`.memory` (mask memory and collator
throughput), :mod:`.report` (targets, bench.md, bench.png) and :mod:`.stage` (the stage).
``python -m paradec.bench layout`` times the collator alone.

``python run.py stage=bench`` writes ``bench.json``, ``bench.md`` and ``bench.png`` in the run dir.

Invariant: every figure that is compared with another is measured in the same run, on the same
model, the same tokens and the same thread count (pinned with ``torch.set_num_threads`` and
reported), with warm-up excluded. Inside each of ``bench.repeats`` repeats the jobs of one K (each
mode, and the bare forwards) take turns on every context, starting with a different job each
time, and every ratio is the median over these side-by-side (repeat, context) pairs, so a change
of machine load hits both sides of a ratio. Ratios use ``bench.clock``: with one thread, ``auto``
means process CPU time, which time taken by other processes on a shared machine cannot inflate;
wall-clock figures are reported beside them. Every decoding mode does the same work: greedy, EOS
ignored, exactly ``new_tokens`` per answer. Every mode runs through the
evaluation's own dispatch (:func:`paradec.evaluation.run_mode`, one context or one question per
call), so the benchmark times exactly what evaluation runs.

What is measured:
  decode        per (K, mode): wall and CPU time of the workload (``contexts`` contexts of
                ``context_tokens`` tokens, each with K questions of ``question_tokens`` tokens),
                questions/s, forward calls per context and the peak KV-cache tokens of one call.
  decode_limit  per K: the speedup of parallel over sequential if the decoder cost nothing but
                its model forwards, from bare forwards of the shapes each mode needs (inputs,
                positions and masks prepared outside the timer, a real growing KV cache):
                ``K * (prefill(N+q) + steps(1)) / (prefill(N+K*q) + steps(K))``, where steps(k)
                is the T-1 one-column steps of k tokens each. Reported beside the achieved one.
  training      one columnar training step (columnar mask, the model's attention
                implementation) over one plain causal step (``attention_mask=None``, i.e.
                ``is_causal`` attention) on the same tokens and model: ``train_overhead``.
                Both sides project every position onto the vocabulary, so the ratio isolates
                what the columnar mask and 2D RoPE cost; the training loop's
                :func:`paradec.training.labelled_loss` also skips the projection of unlabelled
                positions, a saving that depends on the task (answers only vs every token), not
                on the layout.
  masks         bytes of the dense bool ``[1, 1, L, L]`` mask at each ``mask_lengths`` L, and of
                the FlexAttention ``BlockMask`` (:func:`paradec.masks.flex_block_mask`) when it
                can be built here.
  collator      tokens/s of the collator (:func:`paradec.bench.memory.layout_throughput`).
"""

