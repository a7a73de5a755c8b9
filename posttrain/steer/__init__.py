"""Steering and abliteration: find a behaviour's direction in the residual stream, remove or add it.

Arditi et al. (2024), "Refusal in Language Models Is Mediated by a Single Direction": the
difference between the mean residual-stream activations on two contrastive prompt sets
(harmful vs harmless) is a direction r; erasing r everywhere stops refusals, adding it
induces them. The same machinery works for any behaviour that lives along a direction.

- `activations.py`    mean residual-stream activations per (layer, position), fp32, by hooks
- `directions.py`     difference of means per (layer, position), normalised; projected variant
- `residual.py`       which modules write to the residual stream, per architecture
- `interventions.py`  (a) directional-ablation hooks, (b) weight orthogonalisation (optionally
                      norm-preserving), (c) activation addition, (d) the weight edit as a LoRA adapter
- `abliterate.py`     candidate directions scored by refusal and KL; the chosen one
- `prompts.py`        contrastive prompt sets: read (data files or text), check, split
- `evaluation.py`     before/after numbers (refusals, induced refusals, KL, accuracy), scores plot
- `search.py`         `search=optuna`: fractional layer + per-block edit strengths, Pareto front
- `heal.py`           `heal=dpo`: a short DPO pass after the edit, folded into the weights
- `cli.py`            `posttrain abliterate`: the whole pipeline into one atomic run folder
- `steer_cli.py`      `posttrain steer`: add or remove any contrastive behaviour's direction
"""
