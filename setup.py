from setuptools import find_packages, setup

setup(
    name="llama-adapter-triton",
    version="0.1.0",
    description="LLaMA-Adapter (zero-init attention) on a fused Triton kernel: op, model, fine-tuning, benchmarks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kernels*", "model*", "train*", "bench*"], exclude=["tests*"]),
    package_data={"train": ["data/*.json", "data/*.jsonl", "data/make_demo.py"]},  # the demo reads its tables
    python_requires=">=3.10",
    install_requires=[
        # torch.library.custom_op needs 2.4, SDPA's enable_gqa (the model's plain layers) 2.5
        "torch>=2.5,<2.16",
        # Triton ships Linux wheels only; elsewhere the op falls back to the PyTorch reference.
        "triton>=3.1; platform_system == 'Linux'",
        "numpy",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "tiktoken>=0.6",  # Meta's Llama-3 tokenizer.model
        "jinja2>=3.1.6,<4",  # chat templates (model/chat.py); 3.1.6 closes known sandbox escapes
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        # transformers: the tests compare our LLaMA against LlamaForCausalLM;
        # peft: they compare our import of a PEFT adaption-prompt adapter against PEFT's own logits.
        # bitsandbytes: the quantized base's tests (model/quantize.py), on the CPU too.
        "dev": ["pytest>=8", "pytest-benchmark>=4", "transformers>=4.45", "peft>=0.13", "ruff>=0.5",
                "bitsandbytes>=0.50,<0.52"],
        # --quantize nf4|int8 (model/quantize.py): bitsandbytes' NF4 and LLM.int8 layers, CUDA or CPU
        "quantize": ["bitsandbytes>=0.50,<0.52"],
        # the loss's fused linear + cross-entropy kernel on CUDA (train/loss.py); a chunked torch path elsewhere
        "liger": ["liger-kernel>=0.6,<0.9"],
        # model/hf.py (use_fused_attention): transformers' attention registry (5.x) and PEFT's adaption prompt, as
        # checked (transformers 5.24, peft 0.21)
        "hf": ["transformers>=5.0,<6", "peft>=0.21,<0.22"],
        # the multi-modal adapter's CLIP image encoder (model/visual.py); Pillow comes with matplotlib
        "vision": ["transformers>=4.45", "pillow"],
        # xformers has no CPU use and pins torch builds: GPU benchmark machines only.
        "bench": ["xformers"],
    },
)
