"""Optional integrations, each imported only when used: Hugging Face transformers
(``quant_method = "lqlora"``, :mod:`.hf`, registered lazily by :mod:`.hf_hook`) and PEFT
(:mod:`.peft`)."""
