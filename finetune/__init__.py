"""Downstream evaluation of a backbone: linear probe (``mae-probe``) and full fine-tune (``mae-finetune``)."""
