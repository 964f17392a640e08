// Test preconditions, decided when the tests are built, shared by the build scripts of saeflow-core and of
// the root package (`include!`d by both, so they agree).
//
// A test that needs something a fresh clone may lack (`../shared` beside the checkout, a tool, a mount)
// says so with `#[cfg_attr(missing = "shared", ignore = "needs ../shared")]`: where it is missing the test
// is *ignored* — `cargo test` lists it with its reason and counts it — instead of passing without checking
// anything. With `SAEFLOW_NO_SKIP=1` (set by `.ci/run`) a missing precondition fails the build instead —
// except a CPU feature (`Preconditions::cpu`), which no install provides: CI machines differ in CPU, so
// those tests are ignored with their reason there too.
//
// Cargo cannot watch for a path that does not exist yet without rerunning this script (and rebuilding
// every test) on each build, so after adding what was missing, `touch build.rs` to look again.

use std::path::{Path, PathBuf};

/// The preconditions checked so far, each with whether it holds and how to provide it.
struct Preconditions {
    checked: Vec<(&'static str, Option<String>)>,
    /// CPU features: never fail the build.
    hardware: Vec<(&'static str, Option<String>)>,
}

#[allow(dead_code)] // each build script uses the checks it needs
impl Preconditions {
    fn new() -> Self {
        println!("cargo::rerun-if-changed=build.rs");
        println!("cargo::rerun-if-env-changed=SAEFLOW_NO_SKIP");
        Preconditions {
            checked: Vec::new(),
            hardware: Vec::new(),
        }
    }

    /// `missing = "shared"`: the fixtures, models and data expected beside the workspace, at `../shared`.
    fn shared(mut self) -> Self {
        let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
        let workspace = manifest
            .ancestors()
            .find(|d| d.join("Cargo.lock").is_file())
            .unwrap_or(&manifest);
        let shared = workspace.join("../shared");
        let marker = shared.join("DESIGN.md");
        let fix = if marker.is_file() {
            println!("cargo::rerun-if-changed={}", marker.display());
            None
        } else {
            Some(format!(
                "{} (the fixtures, models and data beside the checkout) is absent",
                shared.display()
            ))
        };
        self.checked.push(("shared", fix));
        self
    }

    /// `missing = "<name>"`: none of `programs` is an executable on `PATH`.
    fn tool(mut self, name: &'static str, programs: &[&str], install: &str) -> Self {
        println!("cargo::rerun-if-env-changed=PATH");
        let found = programs.iter().find_map(|p| on_path(p));
        let fix = match found {
            Some(path) => {
                println!("cargo::rerun-if-changed={}", path.display());
                None
            }
            None => Some(format!("`{}` is not on PATH ({install})", programs.join("` or `"))),
        };
        self.checked.push((name, fix));
        self
    }

    /// `missing = "tmpfs"`: this process may not mount a filesystem (Linux's CAP_SYS_ADMIN, as root has
    /// outside an unprivileged container).
    fn mount(mut self) -> Self {
        let cap_sys_admin = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
                u64::from_str_radix(&hex, 16).ok()
            })
            .is_some_and(|caps| caps & (1 << 21) != 0);
        let fix = (!cap_sys_admin || on_path("mount").is_none())
            .then(|| "mounting a tmpfs needs root (CAP_SYS_ADMIN) and `mount`".to_string());
        self.checked.push(("tmpfs", fix));
        self
    }

    /// `missing = "gpu"`: built with the `cuda` feature, but this machine has no NVIDIA GPU (no
    /// `/dev/nvidiactl`). `SAEFLOW_REQUIRE_CUDA=1` (set by `bench/gpu.sh`) makes that a build failure.
    /// Without the feature the GPU tests are not compiled, and nothing is checked.
    fn gpu(mut self) -> Self {
        println!("cargo::rerun-if-env-changed=SAEFLOW_REQUIRE_CUDA");
        let fix = (std::env::var_os("CARGO_FEATURE_CUDA").is_some()
            && !Path::new("/dev/nvidiactl").exists())
        .then(|| "no NVIDIA GPU here (/dev/nvidiactl is absent)".to_string());
        if let Some(fix) = &fix {
            if std::env::var("SAEFLOW_REQUIRE_CUDA").as_deref() == Ok("1") {
                eprintln!("SAEFLOW_REQUIRE_CUDA=1, but the GPU tests would be skipped: {fix}");
                std::process::exit(1);
            }
        }
        self.checked.push(("gpu", fix));
        self
    }

    /// `missing = "<name>"`: this CPU lacks a feature (`has` is false; `what` names it). Never a build
    /// failure. The tests check at run time too (a target directory may outlive its machine's CPU).
    fn cpu(mut self, name: &'static str, has: bool, what: &str) -> Self {
        self.hardware
            .push((name, (!has).then(|| format!("this CPU has no {what}"))));
        self
    }

    /// Declares every value of `missing`, sets those that do not hold, or fails under `SAEFLOW_NO_SKIP=1`.
    fn finish(self) {
        let names: Vec<String> = self
            .checked
            .iter()
            .chain(&self.hardware)
            .map(|(n, _)| format!("\"{n}\""))
            .collect();
        println!("cargo::rustc-check-cfg=cfg(missing, values({}))", names.join(", "));
        let missing: Vec<_> = self
            .checked
            .iter()
            .filter_map(|(n, fix)| Some((n, fix.as_ref()?)))
            .collect();
        if std::env::var("SAEFLOW_NO_SKIP").as_deref() == Ok("1") && !missing.is_empty() {
            eprintln!("SAEFLOW_NO_SKIP=1, but tests would be skipped here:");
            for (name, fix) in &missing {
                eprintln!("  missing = \"{name}\": {fix}");
            }
            std::process::exit(1);
        }
        let absent_hardware = self.hardware.iter().filter(|(_, fix)| fix.is_some());
        let names = missing.into_iter().map(|(name, _)| *name);
        for name in names.chain(absent_hardware.map(|(name, _)| *name)) {
            println!("cargo::rustc-cfg=missing=\"{name}\"");
        }
    }
}

/// The executable `program` on `PATH`, if any.
fn on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}
