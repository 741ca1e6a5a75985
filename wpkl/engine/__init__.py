"""The engine: one route table (route.py) decides what runs; run.py carries a call through it; the per-token
terms go through one autograd Function (terms.py) fed by an adapter per input form (terms.py: logits; linear.py
with chunks.py: the fused-linear form); the fused op route is fused.py; weights and reduction in torch weigh.py."""
