#!/usr/bin/env python3
"""A CUDA 13.0 toolchain from PyPI for building `--features cuda` on a machine without a GPU (CI).

    python3 scripts/cuda_toolchain.py DIR        # then: source DIR/env.sh

Installs NVIDIA's own wheels (nvcc, cicc, crt/cccl headers, cudart, NVRTC) into DIR, and writes link stubs
for the libraries cudarc links with but a build machine does not need to run: the driver (libcuda), cuBLAS,
cuBLASLt and cuRAND. A stub exports the library's function names (taken from cudarc's own bindings) with
empty bodies, as the CUDA toolkit's `lib64/stubs/libcuda.so` does: the binary links, and on a GPU machine the
real libraries are found first at run time. Nothing built against the stubs can run CUDA code here, but a
binary can start and use NVRTC (which needs no GPU): env.sh's CUDA_STUB_RUNTIME is the LD_LIBRARY_PATH for
that (the stubs under their sonames, and the real NVRTC).

candle-kernels' build compiles its kernels with nvcc for one architecture: CUDA_COMPUTE_CAP (default 90,
Hopper) is set in env.sh.
"""

import glob
import os
import re
import subprocess
import sys

VERSION = "13.0"
WHEELS = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
]
# library -> (cudarc module whose bindings name its functions, the real library's soname, which a binary
# linked against the stub then asks for at run time)
STUBS = {
    "cuda": ("driver", "libcuda.so.1"),
    "cublas": ("cublas", "libcublas.so.13"),
    "cublasLt": ("cublaslt", "libcublasLt.so.13"),
    "curand": ("curand", "libcurand.so.10"),
}


def cudarc_source(repo: str) -> str:
    lock = open(os.path.join(repo, "Cargo.lock")).read()
    match = re.search(r'name = "cudarc"\nversion = "([^"]+)"', lock)
    if not match:
        sys.exit("Cargo.lock has no cudarc: is candle's `cuda` feature still wired to cudarc?")
    version = match.group(1)
    subprocess.run(["cargo", "fetch", "--quiet"], cwd=repo, check=True)
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = glob.glob(os.path.join(home, "registry", "src", "*", f"cudarc-{version}"))
    if not found:
        sys.exit(f"cudarc {version} is not in {home}/registry/src after `cargo fetch`")
    return found[0]


def write_stub(lib_dir: str, name: str, soname: str, functions: list[str]) -> None:
    c = os.path.join(lib_dir, f"lib{name}_stub.c")
    with open(c, "w") as f:
        f.write(f"/* Link stub for lib{name}: names only; never called. */\n")
        for fn in functions:
            f.write(f"void {fn}(void) {{}}\n")
    so = os.path.join(lib_dir, f"lib{name}.so")
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", so, c, f"-Wl,-soname,{soname}"], check=True
    )
    os.remove(c)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = os.path.abspath(sys.argv[1])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    home = os.path.join(root, "nvidia", "cu13")
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--target", root, *WHEELS],
            check=True,
        )
    lib = os.path.join(home, "lib")
    for real, link in [("libcudart.so.13", "libcudart.so"), ("libnvrtc.so.13", "libnvrtc.so")]:
        path = os.path.join(lib, link)
        if not os.path.exists(path):
            os.symlink(real, path)
    stubs = os.path.join(home, "lib", "stubs")
    os.makedirs(stubs, exist_ok=True)
    cudarc = cudarc_source(repo)
    for name, (module, soname) in STUBS.items():
        source = open(os.path.join(cudarc, "src", module, "sys", "mod.rs")).read()
        functions = sorted(set(re.findall(r"^\s+(?:pub )?fn (\w+)\(", source, re.M)))
        if len(functions) < 10:
            sys.exit(f"found only {len(functions)} functions in cudarc's {module} bindings")
        write_stub(stubs, name, soname, functions)
    # The stubs under the names a linked binary asks the loader for (to start one here; never for a GPU).
    run = os.path.join(home, "lib", "stub-runtime")
    os.makedirs(run, exist_ok=True)
    for name, (_, soname) in STUBS.items():
        path = os.path.join(run, soname)
        if not os.path.lexists(path):
            os.symlink(os.path.join(stubs, f"lib{name}.so"), path)
    with open(os.path.join(root, "env.sh"), "w") as f:
        f.write(
            f'export CUDA_HOME="{home}" CUDA_PATH="{home}"\n'
            f'export PATH="{home}/bin:$PATH"\n'
            f'export LIBRARY_PATH="{lib}:{stubs}${{LIBRARY_PATH:+:$LIBRARY_PATH}}"\n'
            f'export CUDA_COMPUTE_CAP="${{CUDA_COMPUTE_CAP:-90}}"\n'
            f'export CUDARC_CUDA_VERSION="{VERSION.replace(".", "0")}0"\n'
            f'export CUDA_STUB_RUNTIME="{run}:{lib}"\n'
        )
    print(f"CUDA {VERSION} toolchain in {home}; link stubs in {stubs}; source {root}/env.sh")


if __name__ == "__main__":
    main()
