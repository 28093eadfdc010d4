"""interp.kernels: attention kernels with per-head interventions and streamed statistics
(installed as interp.kernels, never as a top-level `kernels`, which transformers probes for)."""
