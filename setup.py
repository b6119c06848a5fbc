from setuptools import setup
from setuptools.command.build_py import build_py

# One import name, ours alone: the repository's root is the package llama_adapter_triton (its __init__.py and
# __main__.py sit beside setup.py), and kernels/, model/, train/ and bench/ are its subpackages. They have no
# __init__.py of their own, so that no folder of ours is a top-level package that could shadow another
# distribution's (Hugging Face's `kernels`, which transformers imports) when the root is on sys.path.
PACKAGE = "llama_adapter_triton"
SUBPACKAGES = ["kernels", "model", "model.adapters", "train", "bench"]


class BuildPy(build_py):
    """The package's own modules are the root's __init__.py and __main__.py: not this setup.py beside them."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if (m[0], m[1]) != (PACKAGE, "setup")]


setup(
    name="llama-adapter-triton",
    version="0.1.0",
    description="LLaMA-Adapter (zero-init attention) on a fused Triton kernel: op, model, fine-tuning, benchmarks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={PACKAGE: "."},
    packages=[PACKAGE, *(f"{PACKAGE}.{sub}" for sub in SUBPACKAGES)],
    package_data={f"{PACKAGE}.train": ["demo_data/*.json", "demo_data/*.jsonl", "demo_data/*.md",
                                       "demo_data/make_demo.py"]},
    cmdclass={"build_py": BuildPy},
    entry_points={"console_scripts": [f"llama-adapter = {PACKAGE}.__main__:main"]},
    python_requires=">=3.10",
    # Ranges for users, up to the next release that may break (major, or minor below 1.0) past what the suite
    # passed with; the suite itself runs on constraints.txt's exact versions.
    install_requires=[
        # torch.library.custom_op needs 2.4, SDPA's enable_gqa (the model's plain layers) 2.5
        "torch>=2.5,<2.16",
        # Triton ships Linux wheels only; elsewhere the op runs two SDPA calls. A CUDA torch pins
        # its own triton: no tighter bound here.
        "triton>=3.1,<4; platform_system == 'Linux'",
        "numpy>=1.24,<3",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.19,<0.24",
        "tiktoken>=0.6,<0.15",  # Meta's Llama-3 tokenizer.model
        "jinja2>=3.1.6,<4",  # chat templates (model/chat.py); 3.1.6 closes known sandbox escapes
        "safetensors>=0.4,<0.9",
        "tqdm>=4.66,<5",
        "matplotlib>=3.7,<4",
    ],
    extras_require={
        # transformers: the tests compare our LLaMA against LlamaForCausalLM, and test model/hf.py (5.x);
        # peft: they compare our import of a PEFT adaption-prompt adapter against PEFT's own logits.
        # bitsandbytes: the quantized base's tests (model/quantize.py), on the CPU too.
        # kernels: Hugging Face's, which transformers imports: in the test environment on purpose, so that the
        # package tests see that no folder of ours shadows it. setuptools: the wheel test builds without isolation.
        "dev": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "transformers>=5.0,<6", "peft>=0.21,<0.22",
                "ruff>=0.5,<0.18", "bitsandbytes>=0.50,<0.52", "kernels>=0.10,<0.20", "setuptools>=70.1"],
        # --quantize nf4|int8 (model/quantize.py): bitsandbytes' NF4 and LLM.int8 layers, CUDA or CPU
        "quantize": ["bitsandbytes>=0.50,<0.52"],
        # the loss's fused linear + cross-entropy kernel on CUDA (train/loss.py); a chunked torch path elsewhere
        "liger": ["liger-kernel>=0.6,<0.9"],
        # model/hf.py (use_fused_attention): transformers' attention registry (5.x) and PEFT's adaption prompt, as
        # checked (transformers 5.25, peft 0.21)
        "hf": ["transformers>=5.0,<6", "peft>=0.21,<0.22"],
        # the multi-modal adapter's CLIP image encoder (model/visual.py); Pillow comes with matplotlib
        "vision": ["transformers>=4.45,<6", "pillow"],
        # xformers has no CPU use and pins torch builds: GPU benchmark machines only.
        "bench": ["xformers"],
    },
)
