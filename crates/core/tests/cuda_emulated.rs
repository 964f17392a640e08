//! The CUDA kernels' logic on any machine: `tests/cuda_emulation/harness.cpp` compiles the kernel sources of
//! `src/kernels/cuda` as C++ under a small emulation of CUDA's threads (`cuda_on_cpu.h`: a thread per CUDA
//! thread, `__syncthreads` a barrier) and checks them against plain references: TopK masks (ties included),
//! BatchTopK's cut, the sparse products (rows past the shared list, empty rows). The GPU tests
//! (`tests/cuda.rs`) check the same kernels on real hardware, with timing; these check them everywhere.

use std::path::Path;
use std::process::Command;

#[test]
#[cfg_attr(missing = "cxx", ignore = "needs g++ (apt-get install g++)")]
fn the_cuda_kernels_compute_their_references_under_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("src/kernels/cuda");
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("harness");
    let define = |name: &str, file: &str| format!("-D{name}=\"{}\"", kernels.join(file).display());
    let built = Command::new("g++")
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg(define("KERNELS_TOPK", "topk.cu"))
        .arg(define("KERNELS_SPARSE", "sparse.cu"))
        .arg(root.join("tests/cuda_emulation/harness.cpp"))
        .output()
        .expect("running g++");
    assert!(
        built.status.success(),
        "g++ could not build the harness:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&binary).output().expect("running the harness");
    let report = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(
        report.lines().filter(|l| l.ends_with(": ok")).count(),
        11,
        "{report}"
    );
}
