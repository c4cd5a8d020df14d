"""stage=bench: what parallel decoding buys, measured side by side in one process.

Modules: :mod:`.clocks` (the two clocks and medians), :mod:`.decode` (the workloads, every mode
timed through :func:`paradec.evaluation.run_mode`, and the bare-forward limit),
:mod:`.roofline` (the machine's bandwidth and matmul throughput, and each mode's least time),
:mod:`.training_step` (columnar vs causal step at long lengths), :mod:`.memory` (mask memory,
peak resident memory and collator throughput), :mod:`.report` (targets, bench.md and bench.png)
and :mod:`.stage` (the stage). ``python -m paradec.bench layout`` times the collator alone.

``python run.py stage=bench`` writes ``bench.json``, ``bench.md`` and ``bench.png`` in the run dir.

Invariant: every figure that is compared with another is measured in the same run, on the same
model, the same tokens and the same thread count (pinned with ``torch.set_num_threads`` and
reported), with warm-up excluded. Within a repeat the jobs of one workload take turns on every
context, starting with a different job each time, and every ratio is the median over these
side-by-side (repeat, context) pairs, so a change of machine load hits both sides of a ratio.
Ratios use ``bench.clock``: with one thread, ``auto`` means process CPU time, which time taken by
other processes on a shared machine cannot inflate; wall-clock figures are reported beside them.
Every decoding mode does the same work: greedy, EOS ignored, exactly ``new_tokens`` per answer.
Every mode runs through the evaluation's own dispatch, so the benchmark times exactly what
evaluation runs.

What is measured, for each model of ``bench.models``:
  decode        per context length N, question count K and mode: wall and CPU time of the
                workload (``contexts`` random contexts of N tokens with K questions of
                ``question_tokens`` tokens), questions/s, the time to the first new token
                (prefill) and per decode step after it, forward calls per context, the peak
                KV-cache tokens of one call, the machine limit and the fraction of it reached
                (whole decode and steps alone), and parallel's speedup over the mode (per
                question, whole decode and steps alone). ``sequential`` / ``baseline`` cost the
                same per question at every K: they run once per N and pair with every K.
  bare_limit    at the smallest N, per K: the speedup of parallel over sequential if the decoder
                cost nothing but its model forwards, from bare forwards of the same shapes
                (inputs, positions and masks prepared outside the timer, a real growing KV
                cache): ``K x (one question's forwards) / (parallel's forwards)``.
  data          with ``bench.data_contexts``: every mode on the composed data task's own
                contexts and questions (their real token lengths).
  training      on the first model, at each L of ``train_lengths``: one columnar training step
                (columnar mask, the model's attention implementation) against one plain causal
                step (``attention_mask=None``, i.e. ``is_causal`` attention) on the same tokens:
                time and peak resident memory. Both sides project every position onto the
                vocabulary, so the ratio isolates what the columnar mask and 2D RoPE cost.
  masks         bytes of the dense bool ``[1, 1, L, L]`` mask at each ``mask_lengths`` L, and of
                the FlexAttention ``BlockMask`` (:func:`paradec.masks.flex_block_mask`) when it
                can be built here.
  collator      tokens/s of the collator (:func:`paradec.bench.memory.layout_throughput`).
"""
