//! Records what `spec` and `unhidra_build_info` report: git commit, rustc version, target.

use std::process::Command;

fn main() {
    let commit = std::env::var("GIT_COMMIT")
        .ok()
        .or_else(|| run("git", &["rev-parse", "--short=12", "HEAD"]));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = run(&rustc, &["--version"]);
    println!(
        "cargo:rustc-env=UNHIDRA_BUILD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
    println!(
        "cargo:rustc-env=UNHIDRA_BUILD_RUSTC={}",
        rustc_version.as_deref().unwrap_or("unknown")
    );
    println!(
        "cargo:rustc-env=UNHIDRA_BUILD_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    println!(
        "cargo:rustc-env=UNHIDRA_BUILD_PROFILE={}",
        std::env::var("PROFILE").unwrap_or_default()
    );
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    for path in [
        "../../.git/HEAD",
        "../../.git/refs/heads",
        "../../.git/packed-refs",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
}

fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}
