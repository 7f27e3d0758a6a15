"""The comparison benchmark (``diffmem bench``): diffmem.softmax_mean against plain-torch ways of
computing the same softmax-weighted mean.

For each size (B, N, d) it times, in one run and on the same inputs:

* ``diffmem-<backend>-<precision>``: every available diffmem backend serving the device, both
  precisions ("reference" only with --include-reference: it is slow);
* ``torch-naive``: torch.cdist (default mm mode) squared -> logits -> softmax -> matmul;
* ``torch-naive-direct``: the same with cdist's direct-difference mode;
* ``torch-chunked``: a loop over point chunks with an online (max, sum, acc) merge, matmul form;
* ``sdpa-fold``: scaled_dot_product_attention with the per-point term folded into an extra
  dimension of q and k;
* ``sdpa-mask``: scaled_dot_product_attention with the per-point term as a (1, N) attn_mask;
* ``matmul-floor``: the two bare products x @ y.T and P @ y of the same shapes (a floor, not a
  competitor);
* ``*-backward``: forward + backward of mean.sum() + lse.sum() w.r.t. x, points, alpha and var,
  for each diffmem backend/precision and for torch-naive under autograd.

It prints, per size, the median time, GFLOP/s (4*B*N*d per forward), the ratio to the best
non-diffmem method and to the floor, the per-row relative error against float64 at sigma = 0.5
and 0.01 (median and max over rows), and the peak extra memory; and it writes the table to a CSV.

Inputs are VP-process queries: points y ~ N(0, I), x = alpha*y[j] + sigma*noise with random j,
alpha = sqrt(1 - sigma^2), var = sigma^2. Timing uses sigma = 0.5. alpha and var are scalars
shared by all queries, so that the cdist/SDPA baselines stay simple.

Timing: one warmup call each, then the methods of a size run round-robin (so the load of a
shared machine falls on all of them alike) until each has >= 3 repetitions and, within
--budget seconds, up to 100; the median is reported. Peak memory on CPU is the RSS high-water
of one further call (reset through /proc/self/clear_refs), so it counts C++ allocations too;
on CUDA it is torch.cuda.max_memory_allocated.

Usage (``diffmem bench ...`` and ``python benchmarks/compare.py ...`` are the same):
    python benchmarks/compare.py                      # the four standard sizes, CPU
    python benchmarks/compare.py --quick --sizes "256,10000,64;1024,20000,32"
    python benchmarks/compare.py --device cuda --methods "diffmem-*,sdpa-*,matmul-floor"

Modules: problems.py (inputs and the float64 reference), methods.py (diffmem and its torch
peers), timing.py (interleaved timing, errors, peak memory of one size), report.py (table and
CSV), cli.py (the command).
"""
