"""rim_fast build: the Python package, the Triton kernels (installed as rim_fast.kernels) and the C++/CUDA
extension rim_fast._C (built by torch's BuildExtension with ninja; see csrc/)."""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}

setup(
    name="rim_fast",
    version="0.1.0",
    description="Fast, drop-in Recurrent Inference Machines (torch_rim compatible): Triton + C++/CUDA kernels",
    packages=["rim_fast", "rim_fast.ops", "rim_fast.layers", "rim_fast.architectures", "rim_fast.kernels"],
    package_dir={"rim_fast": "rim_fast", "rim_fast.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy", "tqdm", "torch-ema"],
    extras_require={"test": ["torch-rim==0.2.9", "pytest", "pytest-benchmark", "hypothesis", "expecttest",
                             "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
