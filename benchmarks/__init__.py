"""``mae-bench``: how fast this pipeline trains, and why.

* ``model_step`` — train-step images/s, MFU and peak memory per preset, alternating timed runs.
* ``hf_compare`` — this project's MAE vs Hugging Face ``ViTMAEForPreTraining`` (same architecture).
* ``visible_only`` — the visible-only encoder vs pushing mask tokens through the encoder.
* ``levers`` — each speed setting measured against a plain eager fp32 step.
* ``feed`` — data-loader images/s per worker against the model's demand.
* ``gpu_table`` — expected GPU images/s and MFU computed from FLOPs per image.
"""
